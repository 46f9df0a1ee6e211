"""Triton kernels for the LSTM recurrence (device code only; ``recurrence.py`` launches them).

Work split
==========
Both kernels run a range of time steps. A program is ``(pid_h, pid_b)``:

* ``pid_b`` owns ``BLOCK_B`` batch rows (B is padded up to ``BLOCK_B >= 16`` with masks, since a
  GPU ``tl.dot`` rejects dimensions below 16).
* ``pid_h`` owns the hidden chunks ``pid_h, pid_h + G, pid_h + 2G, ...`` of ``BLOCK_H`` units
  (``G = tl.num_programs(0)``), all four gates of each, so a unit's i, f, g, o and its cell state
  live in one program. The same striding splits the projection/output dimension P.

Three ways of running the same code, picked on the host (``recurrence.plan``), differ only in
``G`` and in where programs synchronize:

* ``SYNC_PROGRAM`` (layout a, "batch tile"): ``G = 1``, so a program owns every hidden unit of its
  rows and the whole time loop runs in one launch. Nothing crosses programs; the only sync is
  ``tl.debug_barrier()`` (a CTA barrier) between writing the new h and reading it back as the
  next step's GEMM operand. W_hh is re-read every step (from L2 once it is warm): this layout
  wins when the batch alone fills the GPU, or when W_hh is small.
* ``SYNC_GRID`` (layout b, "hidden split"): ``G > 1`` programs split the hidden dimension; each
  re-reads only its own W_hh slice every step, which stays in L2 (loads ask for ``evict_last``;
  not L1, which the barrier's acquire invalidates every step). New h chunks go to a global
  exchange buffer and the programs of each batch tile meet at a barrier of their own (an
  atomic counter, release/acquire at GPU scope) once per phase. The host picks this only when
  the grid fits one program per SM, and launches it cooperatively, so the driver either makes
  every program co-resident or refuses the launch (with other work holding SMs) instead of
  letting the spin deadlock. This is what fills the GPU at small batch and large H. Never used
  under the interpreter, which runs programs one after another.
* ``SYNC_NONE`` ("per step"): one step (and one phase) per launch, the kernel boundary is the
  sync. Any size works; costs a launch per step and phase.

Memory
======
Per step and owned chunk the four gate accumulators (BLOCK_B x BLOCK_H, fp32) live in
registers; the GEMM operand (h_{t-1}, K-chunked) and the weight tiles stream through
registers/shared memory as Triton pipelines the K loop. State that must outlive a step is in
global scratch owned by the launch: h (double-buffered by step parity so one barrier per step is
enough: a step reads one buffer and writes the other), the fp32 cell state (updated in place,
each element only ever touched by its owner), and with a projection the pre-projection output
m = o * tanh(c). Loads of data another program wrote ask for ``.cg`` (L2, not the incoherent
L1); where Triton pipelines such a load through an L1-caching async copy instead, the acquire at
the barrier, which invalidates L1, is what keeps it correct.

Numerics
========
GEMM operands are in the input dtype (bf16/fp16 tensor cores, fp32 as IEEE or TF32 per
``DOT_PRECISION``); accumulation, gates and the cell state are fp32. ``UPCAST`` turns every
loaded value into fp32 right after ``tl.load``: the Triton interpreter mis-handles half-precision
arithmetic, so under it all math (and the dots) run in fp32.

Forward phases of one step: (1) gates: z = xproj[t] + h_{t-1} W_hh^T per owned hidden chunk,
activations, cell update, save gates / c; (2) with a projection only: h_t = m W_hr^T per owned
P chunk. Backward phases of one step (reverse order): (1) dz per owned hidden chunk from the
carried dh/dc (with a projection, dm = (dh + dy[t]) W_hr first), written to dxproj[t];
(2) dh_{t-1} = dz W_hh per owned P chunk.
"""

from __future__ import annotations

import inspect
import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Synchronization modes (see the module docstring).
SYNC_NONE = 0
SYNC_PROGRAM = 1
SYNC_GRID = 2


# Set to 0 to launch one fixed config instead of autotuning: a test run on a GPU meets many
# distinct (batch, hidden, proj) keys, and timing every config for each would take minutes.
AUTOTUNE_ENV = "LSTM_FUSED_TRITON_AUTOTUNE"


def _tuning_configs(interpret: bool, autotune: bool):
    """A small autotuning set for GPUs; the interpreter (nothing to time) and runs with
    autotuning off get one fixed config."""
    if interpret:
        return [triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=1)]
    if not autotune:
        return [triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=2)]
    return [
        triton.Config({"BLOCK_K": block_k}, num_warps=warps, num_stages=stages)
        for block_k in (32, 64)
        for warps in (4, 8)
        for stages in (2, 3)
    ]


_CONFIGS = _tuning_configs(INTERPRET, os.environ.get(AUTOTUNE_ENV, "1") != "0")

# Scratch state the kernels update in place: the autotuner must restore it between timed runs.
_FORWARD_STATE = ["h_state_ptr", "c_state_ptr", "m_state_ptr", "barrier_ptr"]
_BACKWARD_STATE = ["dh_state_ptr", "dc_state_ptr", "barrier_ptr"]
# Keyed on the plan's tiles, not the exact batch: a new batch size (a ragged last batch, varying
# inference batches) with the same tiles reuses the tuned config instead of timing all again.
_TUNING_KEY = ["BLOCK_B", "BLOCK_H", "hidden", "proj", "SYNC", "GATES_PHASE", "SECOND_PHASE"]
# Tuned configs persist on disk across processes (a benchmark run after a test run, say), where
# this Triton can (its autotuner's cache_results; never under the interpreter).
_CACHE_RESULTS = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
# Step range and length take many values (one step per launch on the per_step path): Triton
# would compile a variant per value class (1, divisible by 16, other) of each without this.
_RUNTIME_STEP_ARGS = ["step_begin", "step_end", "seq_len"]


# The interpreter narrows fp32 -> bf16 by truncation (ignoring fp_downcast_rounding), which
# doubles the rounding error; emulate round-to-nearest-even there. GPUs round correctly.
_EMULATE_BF16_ROUNDING = tl.constexpr(INTERPRET)


@triton.jit
def _narrow(x, ptr):
    """fp32 ``x`` converted to the element type of ``ptr`` (for storing), rounded to nearest."""
    ty = ptr.dtype.element_ty
    if _EMULATE_BF16_ROUNDING:
        if ty == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(ty)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh via exp: libdevice.tanh does not run under the interpreter.
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _as_dot_operand(x, like_ptr, UPCAST: tl.constexpr):
    """A GEMM operand in the weights' dtype (fp32 everywhere under UPCAST)."""
    if UPCAST:
        return x.to(tl.float32)
    else:
        return x.to(like_ptr.dtype.element_ty)


# Barrier counters of different batch tiles sit 128 bytes apart (int32 elements).
COUNTER_STRIDE = tl.constexpr(32)


@triton.jit
def _grid_barrier(barrier_ptr, generation):
    """Wait until every program of this batch tile has arrived here ``generation`` times in total.

    Batch tiles never read each other's rows, so each has its own counter (fewer programs per
    counter, and no tile waits for another). The counter only grows, so it never needs resetting
    inside a launch. The CTA barrier before the release makes all of this program's stores part
    of what the release publishes; the one after the acquire holds the program's threads until
    the wait is over.
    """
    tl.debug_barrier()
    counter = barrier_ptr + tl.program_id(1) * COUNTER_STRIDE
    tl.atomic_add(counter, 1, sem="release", scope="gpu")
    target = generation * tl.num_programs(0)
    arrived = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    while arrived < target:
        arrived = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _sync(barrier_ptr, generation, SYNC: tl.constexpr):
    if SYNC == 2:  # SYNC_GRID
        _grid_barrier(barrier_ptr, generation)
    elif SYNC == 1:  # SYNC_PROGRAM
        tl.debug_barrier()


@triton.jit
def _load_weight_tile(w_ptr, row0, rows, row_limit, cols, col_limit, row_stride):
    """Transposed tile W[row0 + rows, cols]^T as (len(cols), len(rows)), zero outside the limits."""
    ptrs = w_ptr + (row0 + rows)[None, :] * row_stride + cols[:, None]
    mask = (rows[None, :] < row_limit) & (cols[:, None] < col_limit)
    return tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_last")


@triton.autotune(
    configs=_CONFIGS, key=_TUNING_KEY, restore_value=_FORWARD_STATE[:3], reset_to_zero=["barrier_ptr"], **_CACHE_RESULTS
)
@triton.jit(do_not_specialize=_RUNTIME_STEP_ARGS)
def lstm_forward_kernel(
    xproj_ptr,  # (T, B, 4H) input dtype: x W_ih^T + biases
    w_hh_ptr,  # (4H, P)
    w_hr_ptr,  # (P, H), read only with HAS_PROJ
    lengths_ptr,  # (B,) int64, read only with HAS_LENGTHS
    y_ptr,  # (T, B, P) out
    gates_ptr,  # (T, B, 4H) out, written only with SAVE
    c_all_ptr,  # (T, B, H) fp32 out, written only with SAVE
    h_state_ptr,  # (2, B, P) input dtype: h_{t-1} / h_t by step parity
    c_state_ptr,  # (B, H) fp32, updated in place
    m_state_ptr,  # (B, H) input dtype: o * tanh(c) before the projection (HAS_PROJ)
    barrier_ptr,  # (batch tiles * COUNTER_STRIDE,) int32 zeros, SYNC_GRID only
    step_begin,
    step_end,
    seq_len,  # T
    batch,
    hidden,
    proj,  # P (= hidden without a projection)
    REVERSE: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    SAVE: tl.constexpr,
    GATES_PHASE: tl.constexpr,  # run phase 1 (gates, cell update)
    SECOND_PHASE: tl.constexpr,  # run phase 2 (projection), HAS_PROJ only
    SYNC: tl.constexpr,
    SHARED_LOAD: tl.constexpr,  # cache modifier for data other programs wrote
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_h = tl.program_id(0)
    chunk_stride = tl.num_programs(0) * BLOCK_H
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    rows = offs_b[:, None].to(tl.int64)
    row_ok = offs_b[:, None] < batch
    if HAS_LENGTHS:
        row_len = tl.load(lengths_ptr + offs_b, mask=offs_b < batch, other=0)[:, None]
    arange_h = tl.arange(0, BLOCK_H)
    arange_k = tl.arange(0, BLOCK_K)
    hidden4 = 4 * hidden
    # (a chain `A and B and C` is rejected by Triton's frontend; nest the pairs)
    barriers_per_step = 2 if (HAS_PROJ and (GATES_PHASE and SECOND_PHASE)) else 1

    for step in range(step_begin, step_end):
        if REVERSE:
            t = seq_len - 1 - step
        else:
            t = step
        if HAS_LENGTHS:
            active = t < row_len
        else:
            active = row_ok
        parity = step % 2
        h_read = h_state_ptr + parity * batch * proj
        h_write = h_state_ptr + (1 - parity) * batch * proj
        t64 = t.to(tl.int64)
        generation = (step - step_begin) * barriers_per_step

        if GATES_PHASE:
            xproj_row = xproj_ptr + (t64 * batch + rows) * hidden4
            for j0 in range(pid_h * BLOCK_H, hidden, chunk_stride):
                cols = j0 + arange_h[None, :]
                mask = row_ok & (cols < hidden)
                z_i = tl.load(xproj_row + cols, mask=mask, other=0.0).to(tl.float32)
                z_f = tl.load(xproj_row + hidden + cols, mask=mask, other=0.0).to(tl.float32)
                z_g = tl.load(xproj_row + 2 * hidden + cols, mask=mask, other=0.0).to(tl.float32)
                z_o = tl.load(xproj_row + 3 * hidden + cols, mask=mask, other=0.0).to(tl.float32)
                for k0 in range(0, proj, BLOCK_K):
                    ks = k0 + arange_k
                    h_prev = tl.load(
                        h_read + rows * proj + ks[None, :],
                        mask=row_ok & (ks[None, :] < proj),
                        other=0.0,
                        cache_modifier=SHARED_LOAD,
                    )
                    h_prev = _as_dot_operand(h_prev, w_hh_ptr, UPCAST)
                    units = j0 + arange_h
                    w = _load_weight_tile(w_hh_ptr, 0, units, hidden, ks, proj, proj)
                    z_i += tl.dot(h_prev, _as_dot_operand(w, w_hh_ptr, UPCAST), input_precision=DOT_PRECISION)
                    w = _load_weight_tile(w_hh_ptr, hidden, units, hidden, ks, proj, proj)
                    z_f += tl.dot(h_prev, _as_dot_operand(w, w_hh_ptr, UPCAST), input_precision=DOT_PRECISION)
                    w = _load_weight_tile(w_hh_ptr, 2 * hidden, units, hidden, ks, proj, proj)
                    z_g += tl.dot(h_prev, _as_dot_operand(w, w_hh_ptr, UPCAST), input_precision=DOT_PRECISION)
                    w = _load_weight_tile(w_hh_ptr, 3 * hidden, units, hidden, ks, proj, proj)
                    z_o += tl.dot(h_prev, _as_dot_operand(w, w_hh_ptr, UPCAST), input_precision=DOT_PRECISION)
                i = _sigmoid(z_i)
                f = _sigmoid(z_f)
                g = _tanh(z_g)
                o = _sigmoid(z_o)
                c_ptrs = c_state_ptr + rows * hidden + cols
                c_prev = tl.load(c_ptrs, mask=mask, other=0.0)
                c_new = f * c_prev + i * g
                m = o * _tanh(c_new)
                c_kept = tl.where(active, c_new, c_prev)
                tl.store(c_ptrs, c_kept, mask=mask)
                if SAVE:
                    gate_row = gates_ptr + (t64 * batch + rows) * hidden4
                    tl.store(gate_row + cols, _narrow(tl.where(active, i, 0.0), gates_ptr), mask=mask)
                    tl.store(gate_row + hidden + cols, _narrow(tl.where(active, f, 0.0), gates_ptr), mask=mask)
                    tl.store(gate_row + 2 * hidden + cols, _narrow(tl.where(active, g, 0.0), gates_ptr), mask=mask)
                    tl.store(gate_row + 3 * hidden + cols, _narrow(tl.where(active, o, 0.0), gates_ptr), mask=mask)
                    tl.store(c_all_ptr + (t64 * batch + rows) * hidden + cols, c_kept, mask=mask)
                if HAS_PROJ:
                    tl.store(m_state_ptr + rows * hidden + cols, _narrow(m, m_state_ptr), mask=mask)
                else:  # P == H: m is h_t; inactive rows carry h_{t-1} and output zeros
                    h_carried = tl.load(h_read + rows * proj + cols, mask=mask, other=0.0).to(tl.float32)
                    h_next = tl.where(active, m, h_carried)
                    tl.store(h_write + rows * proj + cols, _narrow(h_next, h_write), mask=mask)
                    y_row = y_ptr + (t64 * batch + rows) * proj
                    tl.store(y_row + cols, _narrow(tl.where(active, m, 0.0), y_ptr), mask=mask)

        if HAS_PROJ:
            if GATES_PHASE and SECOND_PHASE:
                _sync(barrier_ptr, generation + 1, SYNC)  # every m chunk is written
            if SECOND_PHASE:
                for p0 in range(pid_h * BLOCK_H, proj, chunk_stride):
                    outs = p0 + arange_h
                    cols = outs[None, :]
                    mask = row_ok & (cols < proj)
                    h_new = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                    for k0 in range(0, hidden, BLOCK_K):
                        ks = k0 + arange_k
                        m = tl.load(
                            m_state_ptr + rows * hidden + ks[None, :],
                            mask=row_ok & (ks[None, :] < hidden),
                            other=0.0,
                            cache_modifier=SHARED_LOAD,
                        )
                        w = _load_weight_tile(w_hr_ptr, 0, outs, proj, ks, hidden, hidden)
                        h_new += tl.dot(
                            _as_dot_operand(m, w_hr_ptr, UPCAST),
                            _as_dot_operand(w, w_hr_ptr, UPCAST),
                            input_precision=DOT_PRECISION,
                        )
                    h_carried = tl.load(h_read + rows * proj + cols, mask=mask, other=0.0).to(tl.float32)
                    h_next = tl.where(active, h_new, h_carried)
                    tl.store(h_write + rows * proj + cols, _narrow(h_next, h_write), mask=mask)
                    y_row = y_ptr + (t64 * batch + rows) * proj
                    tl.store(y_row + cols, _narrow(tl.where(active, h_new, 0.0), y_ptr), mask=mask)

        _sync(barrier_ptr, generation + barriers_per_step, SYNC)  # h_t is complete


@triton.autotune(
    configs=_CONFIGS, key=_TUNING_KEY, restore_value=_BACKWARD_STATE[:2], reset_to_zero=["barrier_ptr"], **_CACHE_RESULTS
)
@triton.jit(do_not_specialize=_RUNTIME_STEP_ARGS)
def lstm_backward_kernel(
    dy_ptr,  # (T, B, P)
    w_hh_ptr,  # (4H, P)
    w_hr_ptr,  # (P, H), HAS_PROJ only
    lengths_ptr,  # (B,) int64, HAS_LENGTHS only
    gates_ptr,  # (T, B, 4H) activated gates from the forward
    c_all_ptr,  # (T, B, H) fp32 cell states from the forward
    c0_ptr,  # (B, H) the initial cell state
    dxproj_ptr,  # (T, B, 4H) out: dz, zero at inactive steps
    dh_total_ptr,  # (T, B, P) fp32 out, HAS_PROJ and SAVE_DH_TOTAL only: dh + dy[t] (for dW_hr)
    dh_state_ptr,  # (2, B, P) fp32: the dh carry by backward-step parity
    dc_state_ptr,  # (B, H) fp32, updated in place
    barrier_ptr,  # (batch tiles * COUNTER_STRIDE,) int32 zeros, SYNC_GRID only
    step_begin,  # counted in backward order: backward step r handles forward step T-1-r
    step_end,
    seq_len,
    batch,
    hidden,
    proj,
    REVERSE: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    SAVE_DH_TOTAL: tl.constexpr,
    GATES_PHASE: tl.constexpr,  # run phase 1 (dz)
    SECOND_PHASE: tl.constexpr,  # run phase 2 (dh_{t-1} = dz W_hh)
    SYNC: tl.constexpr,
    SHARED_LOAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_h = tl.program_id(0)
    chunk_stride = tl.num_programs(0) * BLOCK_H
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    rows = offs_b[:, None].to(tl.int64)
    row_ok = offs_b[:, None] < batch
    if HAS_LENGTHS:
        row_len = tl.load(lengths_ptr + offs_b, mask=offs_b < batch, other=0)[:, None]
    arange_h = tl.arange(0, BLOCK_H)
    arange_k = tl.arange(0, BLOCK_K)
    hidden4 = 4 * hidden
    barriers_per_step = 2 if (GATES_PHASE and SECOND_PHASE) else 1

    for back_step in range(step_begin, step_end):
        fwd_step = seq_len - 1 - back_step
        if REVERSE:
            t = seq_len - 1 - fwd_step
            t_before = t + 1  # the time the forward visited just before t
        else:
            t = fwd_step
            t_before = t - 1
        if HAS_LENGTHS:
            active = t < row_len
        else:
            active = row_ok
        parity = back_step % 2
        dh_read = dh_state_ptr + parity * batch * proj
        dh_write = dh_state_ptr + (1 - parity) * batch * proj
        t64 = t.to(tl.int64)
        generation = (back_step - step_begin) * barriers_per_step

        if GATES_PHASE:
            dy_row = dy_ptr + (t64 * batch + rows) * proj
            if HAS_PROJ and SAVE_DH_TOTAL:  # dh + dy[t] per owned P chunk, zero where inactive
                for p0 in range(pid_h * BLOCK_H, proj, chunk_stride):
                    cols = p0 + arange_h[None, :]
                    mask = row_ok & (cols < proj)
                    dh_tot = tl.load(dh_read + rows * proj + cols, mask=mask, other=0.0)
                    dh_tot += tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
                    dh_total_row = dh_total_ptr + (t64 * batch + rows) * proj
                    tl.store(dh_total_row + cols, tl.where(active, dh_tot, 0.0), mask=mask)
            gate_row = gates_ptr + (t64 * batch + rows) * hidden4
            for j0 in range(pid_h * BLOCK_H, hidden, chunk_stride):
                units = j0 + arange_h
                cols = units[None, :]
                mask = row_ok & (cols < hidden)
                if HAS_PROJ:  # dm = (dh + dy[t]) W_hr
                    dm = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                    for k0 in range(0, proj, BLOCK_K):
                        ks = k0 + arange_k
                        kmask = row_ok & (ks[None, :] < proj)
                        dh_tot = tl.load(
                            dh_read + rows * proj + ks[None, :], mask=kmask, other=0.0, cache_modifier=SHARED_LOAD
                        )
                        dh_tot += tl.load(dy_row + ks[None, :], mask=kmask, other=0.0).to(tl.float32)
                        # W_hr[k, j] as a (K, BLOCK_H) tile: rows of W_hr are contiguous in j
                        w = tl.load(
                            w_hr_ptr + ks[:, None] * hidden + units[None, :],
                            mask=(ks[:, None] < proj) & (units[None, :] < hidden),
                            other=0.0,
                            eviction_policy="evict_last",
                        )
                        dm += tl.dot(
                            _as_dot_operand(dh_tot, w_hr_ptr, UPCAST),
                            _as_dot_operand(w, w_hr_ptr, UPCAST),
                            input_precision=DOT_PRECISION,
                        )
                else:  # P == H: dm is dh + dy[t] itself
                    dm = tl.load(dh_read + rows * proj + cols, mask=mask, other=0.0, cache_modifier=SHARED_LOAD)
                    dm += tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
                i = tl.load(gate_row + cols, mask=mask, other=0.0).to(tl.float32)
                f = tl.load(gate_row + hidden + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.load(gate_row + 2 * hidden + cols, mask=mask, other=0.0).to(tl.float32)
                o = tl.load(gate_row + 3 * hidden + cols, mask=mask, other=0.0).to(tl.float32)
                c = tl.load(c_all_ptr + (t64 * batch + rows) * hidden + cols, mask=mask, other=0.0)
                # c_{t-1}: the saved state of the step before, or c0 at the first forward step
                step_of_row = rows * 0 + fwd_step  # as a tensor: masks must be tensors
                has_before = step_of_row > 0
                t_before_rows = tl.where(has_before, rows * 0 + t_before, 0)
                c_prev = tl.load(
                    c_all_ptr + (t_before_rows * batch + rows) * hidden + cols, mask=mask & has_before, other=0.0
                )
                c0_here = tl.load(c0_ptr + rows * hidden + cols, mask=mask & (step_of_row == 0), other=0.0)
                c_prev += c0_here.to(tl.float32)

                tanh_c = _tanh(c)
                dc_ptrs = dc_state_ptr + rows * hidden + cols
                dc_carried = tl.load(dc_ptrs, mask=mask, other=0.0)
                dc_total = dc_carried + dm * o * (1.0 - tanh_c * tanh_c)
                dz_i = dc_total * g * i * (1.0 - i)
                dz_f = dc_total * c_prev * f * (1.0 - f)
                dz_g = dc_total * i * (1.0 - g * g)
                dz_o = dm * tanh_c * o * (1.0 - o)
                tl.store(dc_ptrs, tl.where(active, dc_total * f, dc_carried), mask=mask)
                dz_row = dxproj_ptr + (t64 * batch + rows) * hidden4
                tl.store(dz_row + cols, _narrow(tl.where(active, dz_i, 0.0), dxproj_ptr), mask=mask)
                tl.store(dz_row + hidden + cols, _narrow(tl.where(active, dz_f, 0.0), dxproj_ptr), mask=mask)
                tl.store(dz_row + 2 * hidden + cols, _narrow(tl.where(active, dz_g, 0.0), dxproj_ptr), mask=mask)
                tl.store(dz_row + 3 * hidden + cols, _narrow(tl.where(active, dz_o, 0.0), dxproj_ptr), mask=mask)

        if GATES_PHASE and SECOND_PHASE:
            _sync(barrier_ptr, generation + 1, SYNC)  # dz[t] is complete

        if SECOND_PHASE:  # dh_{t-1} = dz W_hh, K running over all 4H gate rows
            dz_row = dxproj_ptr + (t64 * batch + rows) * hidden4
            for p0 in range(pid_h * BLOCK_H, proj, chunk_stride):
                outs = p0 + arange_h
                cols = outs[None, :]
                mask = row_ok & (cols < proj)
                dh_prev = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                for k0 in range(0, hidden4, BLOCK_K):
                    ks = k0 + arange_k
                    dz = tl.load(
                        dz_row + ks[None, :],
                        mask=row_ok & (ks[None, :] < hidden4),
                        other=0.0,
                        cache_modifier=SHARED_LOAD,
                    )
                    w = tl.load(
                        w_hh_ptr + ks[:, None].to(tl.int64) * proj + outs[None, :],
                        mask=(ks[:, None] < hidden4) & (outs[None, :] < proj),
                        other=0.0,
                        eviction_policy="evict_last",
                    )
                    dh_prev += tl.dot(
                        _as_dot_operand(dz, w_hh_ptr, UPCAST),
                        _as_dot_operand(w, w_hh_ptr, UPCAST),
                        input_precision=DOT_PRECISION,
                    )
                dh_carried = tl.load(dh_read + rows * proj + cols, mask=mask, other=0.0)
                tl.store(dh_write + rows * proj + cols, tl.where(active, dh_prev, dh_carried), mask=mask)

        _sync(barrier_ptr, generation + barriers_per_step, SYNC)  # dh_{t-1} is complete
