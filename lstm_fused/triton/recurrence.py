"""Host side of the Triton backend: pick a work split, allocate scratch state, launch the kernels.

``forward`` and ``backward`` implement the recurrence-op contract of ``lstm_fused/reference.py``
(same arguments, same outputs); ``ops.py`` registers them as ``lstm_fused::triton_*``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch import Tensor

from .. import reference

# Mirror kernels.SYNC_* and kernels.COUNTER_STRIDE; kernels.py itself is imported on first
# launch (see _kernels()).
SYNC_NONE, SYNC_PROGRAM, SYNC_GRID = 0, 1, 2
COUNTER_STRIDE = 32

# Set PATH_ENV to one of PATHS to force a work split (tests and benchmarks); unset = heuristic.
PATH_ENV = "LSTM_FUSED_TRITON_PATH"
PATHS = ("batch_tile", "hidden_split", "per_step")
# With per_step: fewer programs along the hidden dimension than chunks, so each program strides
# over several chunks exactly as on the hidden_split path (whose barrier the interpreter cannot run).
HIDDEN_PROGRAMS_ENV = "LSTM_FUSED_TRITON_HIDDEN_PROGRAMS"

# Tests set this: outputs and scratch start as NaN, so anything a kernel fails to write shows up.
POISON_OUTPUTS = False

MIN_DOT = 16  # smallest tl.dot dimension a GPU compile accepts


@dataclass(frozen=True)
class Plan:
    path: str
    block_b: int  # batch rows per program
    block_h: int  # hidden units (and output columns) per chunk
    hidden_programs: int  # programs along the hidden dimension (grid axis 0) for persistent paths


def _kernels():
    """The kernel module, imported on first use rather than with the package.

    ``@triton.jit`` decides at definition time whether a kernel runs under the interpreter, so
    defining the kernels lazily lets ``TRITON_INTERPRET=1`` be set any time before the first
    launch (e.g. by a test module collected after another one imported ``lstm_fused.triton``).
    """
    from . import kernels

    return kernels


def _pow2_at_least(n: int, floor: int = MIN_DOT) -> int:
    return max(floor, triton.next_power_of_2(max(n, 1)))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan(batch: int, hidden: int, proj: int, device: torch.device) -> Plan:
    """Choose how programs split the work (see kernels.py for what each path means).

    * hidden_split (GPU only) when some (BLOCK_B, BLOCK_H) gives every program exactly one
      chunk with the whole grid fitting one program per SM: small batch, W_hh spread over SMs.
    * batch_tile when the batch alone gives about one program per SM, or when W_hh is small
      enough that re-reading it every step is cheap (and launches would dominate per_step).
    * per_step otherwise: the grid no longer fits on the GPU at once, so let the hardware
      schedule many programs per step and pay a launch per step.
    """
    forced = os.environ.get(PATH_ENV)
    widest = max(hidden, proj)
    interpreted = _kernels().INTERPRET or device.type != "cuda"
    if forced:
        if forced not in PATHS:
            raise ValueError(f"lstm_fused: {PATH_ENV}={forced!r} is not one of {PATHS}")
        if forced == "hidden_split" and interpreted:
            raise RuntimeError(
                "lstm_fused: the hidden_split path needs a GPU (its grid barrier would deadlock "
                "under the Triton interpreter, which runs programs one after another)"
            )
        path = forced
    elif interpreted:
        path = "batch_tile"
    else:
        path = None

    if path is None:
        sms = _sm_count(device)
        for block_b in (16, 32, 64):
            for block_h in (16, 32, 64):
                grid = triton.cdiv(batch, block_b) * triton.cdiv(widest, block_h)
                if grid <= sms:
                    chunks = triton.cdiv(widest, block_h)
                    if chunks == 1:  # one program already owns every unit: no grid barrier needed
                        return Plan("batch_tile", block_b, block_h, 1)
                    return Plan("hidden_split", block_b, block_h, chunks)
        if triton.cdiv(batch, 64) * 2 >= sms or hidden * proj <= 128 * 128:
            path = "batch_tile"
        else:
            path = "per_step"

    if path == "batch_tile":
        block_b = min(64, _pow2_at_least(batch))
        return Plan(path, block_b, min(64, _pow2_at_least(widest)), 1)
    if path == "per_step":
        block_b = min(64, _pow2_at_least(batch))
        block_h = 32 if batch <= 16 else 64
        programs = int(os.environ.get(HIDDEN_PROGRAMS_ENV, 0)) or triton.cdiv(widest, block_h)
        return Plan(path, block_b, block_h, programs)
    # hidden_split, forced: the smallest tiles whose grid is co-resident
    sms = _sm_count(device)
    for block_b in (16, 32, 64, 128):
        for block_h in (16, 32, 64):
            chunks = triton.cdiv(widest, block_h)
            batch_tiles = triton.cdiv(batch, block_b)
            if batch_tiles <= sms:
                return Plan(path, block_b, block_h, max(1, min(chunks, sms // batch_tiles)))
    raise RuntimeError(f"lstm_fused: batch {batch} is too large for the hidden_split path")


def _new(shape, dtype, device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _kernel_flags(dtype: torch.dtype, device: torch.device, sync: int) -> dict:
    allow_tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and device.type == "cuda"
    flags = dict(
        SYNC=sync,
        SHARED_LOAD=".cg" if sync == SYNC_GRID else "",
        DOT_PRECISION="tf32" if allow_tf32 else "ieee",
        UPCAST=_kernels().INTERPRET or dtype == torch.float32,
    )
    if sync == SYNC_GRID:
        # The grid barrier needs every program resident at once: a cooperative launch makes the
        # driver guarantee that, or fail the launch, rather than deadlock when other work holds SMs.
        flags["launch_cooperative_grid"] = True
    return flags


def _launches(plan_: Plan, seq_len: int, batch: int, hidden: int, proj: int, has_proj: bool):
    """(grid, step_begin, step_end, extra kernel flags) for each launch of one direction."""
    batch_tiles = triton.cdiv(batch, plan_.block_b)
    if plan_.path in ("batch_tile", "hidden_split"):
        sync = SYNC_PROGRAM if plan_.path == "batch_tile" else SYNC_GRID
        grid = (plan_.hidden_programs, batch_tiles)
        return [(grid, 0, seq_len, dict(GATES_PHASE=True, SECOND_PHASE=True, sync=sync))]
    gates_grid = (min(plan_.hidden_programs, triton.cdiv(hidden, plan_.block_h)), batch_tiles)
    second_grid = (min(plan_.hidden_programs, triton.cdiv(proj, plan_.block_h)), batch_tiles)
    launches = []
    for step in range(seq_len):
        launches.append((gates_grid, step, step + 1, dict(GATES_PHASE=True, SECOND_PHASE=False, sync=SYNC_NONE)))
        if has_proj:
            launches.append((second_grid, step, step + 1, dict(GATES_PHASE=False, SECOND_PHASE=True, sync=SYNC_NONE)))
    return launches


def _barrier_counters(batch: int, plan_: Plan, device: torch.device) -> Tensor:
    """Zeroed grid-barrier counters, one per batch tile, 128 bytes apart (see kernels.py)."""
    return torch.zeros(triton.cdiv(batch, plan_.block_b) * COUNTER_STRIDE, dtype=torch.int32, device=device)


def _check(xproj: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], h0: Tensor, c0: Tensor, lengths):
    T, B, H4 = xproj.shape
    if H4 % 4:
        raise ValueError(f"lstm_fused: xproj's last dim ({H4}) must be 4 * hidden_size")
    H, P = H4 // 4, w_hh.shape[1]
    if xproj.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"lstm_fused: the Triton backend does not implement {xproj.dtype}")
    if w_hh.shape != (4 * H, P) or h0.shape != (B, P) or c0.shape != (B, H):
        raise ValueError("lstm_fused: inconsistent shapes for w_hh / h0 / c0")
    if w_hr is None and P != H:
        raise ValueError("lstm_fused: w_hh has P != H columns but no w_hr was given")
    if w_hr is not None and w_hr.shape != (P, H):
        raise ValueError(f"lstm_fused: w_hr must be ({P}, {H}), got {tuple(w_hr.shape)}")
    for name, t in (("w_hh", w_hh), ("w_hr", w_hr), ("h0", h0), ("c0", c0)):
        if t is not None and t.dtype != xproj.dtype:
            raise TypeError(f"lstm_fused: {name} is {t.dtype}, xproj is {xproj.dtype}")
    if lengths is not None and lengths.shape != (B,):
        raise ValueError(f"lstm_fused: lengths must have shape ({B},)")
    return T, B, H, P


class _device_guard:
    """Make ``device`` current for the launches (Triton launches on its current stream)."""

    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def forward(xproj, w_hh, w_hr, h0, c0, lengths, reverse: bool, save: bool):
    T, B, H, P = _check(xproj, w_hh, w_hr, h0, c0, lengths)
    dtype, device = xproj.dtype, xproj.device
    acc = reference.acc_dtype(dtype)
    xproj, w_hh, h0 = xproj.contiguous(), w_hh.contiguous(), h0.contiguous()
    w_hr = None if w_hr is None else w_hr.contiguous()
    if lengths is not None:
        lengths = lengths.to(device=device, dtype=torch.int64).contiguous()

    y = _new((T, B, P), dtype, device)
    gates = _new((T, B, 4 * H), dtype, device) if save else xproj.new_empty(0)
    c_all = _new((T, B, H), acc, device) if save else xproj.new_empty(0, dtype=acc)
    if T == 0 or B == 0:
        return y, h0.clone(), c0.clone(), gates, c_all

    h_state = _new((2, B, P), dtype, device)
    h_state[0].copy_(h0)
    c_state = c0.to(acc).contiguous().clone()
    m_state = _new((B, H), dtype, device) if w_hr is not None else h_state  # placeholder when unused
    plan_ = plan(B, H, P, device)
    barrier = _barrier_counters(B, plan_, device)
    dummy_lengths = lengths if lengths is not None else barrier
    dummy_w_hr = w_hr if w_hr is not None else w_hh

    with _device_guard(device):
        for grid, begin, end, extra in _launches(plan_, T, B, H, P, w_hr is not None):
            _kernels().lstm_forward_kernel[grid](
                xproj, w_hh, dummy_w_hr, dummy_lengths,
                y, gates if save else y, c_all if save else c_state,
                h_state, c_state, m_state, barrier,
                begin, end, T, B, H, P,
                REVERSE=reverse,
                HAS_LENGTHS=lengths is not None,
                HAS_PROJ=w_hr is not None,
                SAVE=save,
                GATES_PHASE=extra["GATES_PHASE"],
                SECOND_PHASE=extra["SECOND_PHASE"],
                BLOCK_B=plan_.block_b,
                BLOCK_H=plan_.block_h,
                **_kernel_flags(dtype, device, extra["sync"]),
            )  # fmt: skip
    return y, h_state[T % 2].clone(), c_state.to(dtype), gates, c_all


def _weight_grad_hh(dxproj: Tensor, y: Tensor, h0: Tensor, lengths, reverse: bool) -> Tensor:
    """dW_hh = sum_t dz_t^T h_{t-1}: one GEMM over all T*B rows (plus the h0 rows)."""
    T, B, H4 = dxproj.shape
    P = y.shape[2]
    compute = torch.float32 if dxproj.device.type == "cpu" else dxproj.dtype  # CUDA GEMMs accumulate in fp32 anyway
    dz = dxproj.to(compute)
    if lengths is not None:  # padding changes which row is h_{t-1}; rebuild it
        h_prev = reference.previous_hidden(y.to(compute), h0.to(compute), lengths, reverse)
        return (dz.reshape(T * B, H4).t() @ h_prev.reshape(T * B, P)).to(dxproj.dtype)
    first = T - 1 if reverse else 0  # the step that saw h0
    dw = dz[first].t() @ h0.to(compute)
    if T > 1:
        later = dz[:-1] if reverse else dz[1:]
        prev = y[1:] if reverse else y[:-1]
        dw = torch.addmm(dw, later.reshape(-1, H4).t(), prev.to(compute).reshape(-1, P))
    return dw.to(dxproj.dtype)


def backward(dy, dh_n, dc_n, w_hh, w_hr, h0, c0, lengths, reverse: bool, y, gates, c_all, weight_grads: bool):
    T, B, H4 = gates.shape
    H, P = H4 // 4, w_hh.shape[1]
    dtype, device = y.dtype, y.device
    acc = reference.acc_dtype(dtype)
    if gates.numel() == 0 and T * B * H4 != 0:
        raise RuntimeError("lstm_fused: triton_backward needs the gates saved by a save=True forward")
    dy, gates, c_all = dy.contiguous(), gates.contiguous(), c_all.contiguous()
    w_hh, c0 = w_hh.contiguous(), c0.contiguous()
    w_hr = None if w_hr is None else w_hr.contiguous()
    if lengths is not None:
        lengths = lengths.to(device=device, dtype=torch.int64).contiguous()
    has_proj = w_hr is not None
    save_dh_total = has_proj and weight_grads

    dxproj = _new((T, B, H4), dtype, device)
    dh_state = _new((2, B, P), acc, device)
    dh_state[0].copy_(dh_n)
    dc_state = dc_n.to(acc).contiguous().clone()
    dh_total = _new((T, B, P), acc, device) if save_dh_total else dc_state  # placeholder when unused

    if T > 0 and B > 0:
        plan_ = plan(B, H, P, device)
        barrier = _barrier_counters(B, plan_, device)
        with _device_guard(device):
            for grid, begin, end, extra in _launches(plan_, T, B, H, P, True):
                _kernels().lstm_backward_kernel[grid](
                    dy, w_hh, w_hr if has_proj else w_hh, lengths if lengths is not None else barrier,
                    gates, c_all, c0,
                    dxproj, dh_total, dh_state, dc_state, barrier,
                    begin, end, T, B, H, P,
                    REVERSE=reverse,
                    HAS_LENGTHS=lengths is not None,
                    HAS_PROJ=has_proj,
                    SAVE_DH_TOTAL=save_dh_total,
                    GATES_PHASE=extra["GATES_PHASE"],
                    SECOND_PHASE=extra["SECOND_PHASE"],
                    BLOCK_B=plan_.block_b,
                    BLOCK_H=plan_.block_h,
                    **_kernel_flags(dtype, device, extra["sync"]),
                )  # fmt: skip

    if weight_grads and T == 0:
        dw_hh = w_hh.new_zeros(w_hh.shape)
        dw_hr = w_hr.new_zeros(w_hr.shape) if has_proj else y.new_empty(0)
    elif weight_grads:
        dw_hh = _weight_grad_hh(dxproj, y, h0, lengths, reverse)
        if has_proj:  # dW_hr = sum_t (dh + dy)_t^T m_t with m = o * tanh(c), zero rows where inactive
            m_all = gates[..., 3 * H :].to(acc) * torch.tanh(c_all)
            dw_hr = (dh_total.reshape(T * B, P).t() @ m_all.reshape(T * B, H)).to(dtype)
        else:
            dw_hr = y.new_empty(0)
    else:
        dw_hh, dw_hr = w_hh.new_empty(0), w_hh.new_empty(0)
    return dxproj, dw_hh, dw_hr, dh_state[T % 2].to(dtype, copy=True), dc_state.to(dtype)
