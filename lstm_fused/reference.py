"""Plain-PyTorch LSTM recurrence: the oracle every backend is tested against.

The recurrence op contract (shared by every backend; see ``ops.py`` for the schemas):

``recurrence_forward(xproj, w_hh, w_hr, h0, c0, lengths, reverse, save)
    -> (y, h_n, c_n, gates, c_all)``

* ``xproj``  (T, B, 4H): x @ W_ih^T + b_ih + b_hh, gate order i, f, g, o.
* ``w_hh``   (4H, P) where P = proj_size or H; ``w_hr`` (P, H) or None.
* ``h0`` (B, P), ``c0`` (B, H), same dtype as ``xproj``.
* ``lengths`` (B,) int64 on the device of ``xproj``, or None (= every sequence has length T).
  Step t of sequence b is *active* when t < lengths[b]. An inactive step leaves (h, c)
  unchanged and writes y[t, b] = 0. With ``reverse`` the steps are visited t = T-1 .. 0, so a
  sequence's padding comes first and its state starts from h0/c0 at its own last element.
* ``y`` (T, B, P), ``h_n`` (B, P), ``c_n`` (B, H) in the input dtype.
* With ``save`` the op also returns what backward needs, else two empty tensors:
  ``gates`` (T, B, 4H): activated i, f, g, o (input dtype; zero at inactive steps), and
  ``c_all`` (T, B, H): the cell *state* after step t (fp32, or fp64 for fp64 input; at an
  inactive step this is the carried state).

``recurrence_backward(dy, dh_n, dc_n, w_hh, w_hr, h0, c0, lengths, reverse, y, gates, c_all,
    weight_grads) -> (dxproj, dw_hh, dw_hr, dh0, dc0)``

``dw_hr`` is an empty tensor when ``w_hr`` is None; with ``weight_grads=False`` both weight
gradients are empty tensors (frozen weights: their T*B-row GEMMs are skipped). The functions
below implement the math; ``ops.py`` wraps them as the ``reference_*`` ops. Arithmetic is done in fp32 (fp64 for fp64
input) whatever the storage dtype, matching the kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic and the cell state use for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def step_order(T: int, reverse: bool) -> range:
    return range(T - 1, -1, -1) if reverse else range(T)


def active_mask(lengths: Optional[Tensor], t: int, B: int, device) -> Optional[Tensor]:
    """(B, 1) bool: which sequences are still running at time t (None: all of them)."""
    if lengths is None:
        return None
    return (lengths.to(device) > t).view(B, 1)


def previous_hidden(y: Tensor, h0: Tensor, lengths: Optional[Tensor], reverse: bool) -> Tensor:
    """h_{t-1} as step t saw it, rebuilt from the outputs: (T, B, P).

    Forward: y[t-1] (h0 at t=0). Reverse: y[t+1], or h0 where step t+1 was padding. Rows of
    inactive steps are never used (their gate gradients are zero), so they may hold anything.
    """
    T, B, _ = y.shape
    if reverse:
        h_prev = torch.cat([y[1:], h0.unsqueeze(0)], dim=0)
        if lengths is not None:
            t_next = torch.arange(1, T + 1, device=y.device).view(T, 1, 1)
            starts_here = t_next >= lengths.to(y.device).view(1, B, 1)
            h_prev = torch.where(starts_here, h0.unsqueeze(0), h_prev)
        return h_prev
    return torch.cat([h0.unsqueeze(0), y[:-1]], dim=0)


def recurrence_forward_ref(
    xproj: Tensor,
    w_hh: Tensor,
    w_hr: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    lengths: Optional[Tensor],
    reverse: bool,
    save: bool,
):
    T, B, H4 = xproj.shape
    H = H4 // 4
    dtype, acc = xproj.dtype, acc_dtype(xproj.dtype)
    w_hh_a = w_hh.to(acc)
    w_hr_a = None if w_hr is None else w_hr.to(acc)
    h = h0.to(acc)
    c = c0.to(acc)
    ys, gates_all, cs = [None] * T, [None] * T, [None] * T
    for t in step_order(T, reverse):
        z = xproj[t].to(acc) + h @ w_hh_a.t()
        i, f, g, o = z.chunk(4, dim=1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c_new = f * c + i * g
        h_new = o * c_new.tanh()
        if w_hr_a is not None:
            h_new = h_new @ w_hr_a.t()
        act = active_mask(lengths, t, B, xproj.device)
        gates_t = torch.cat([i, f, g, o], dim=1)
        if act is None:
            c, h, y_t = c_new, h_new, h_new
        else:
            c = torch.where(act, c_new, c)
            h = torch.where(act, h_new, h)
            y_t = torch.where(act, h_new, torch.zeros_like(h_new))
            gates_t = torch.where(act, gates_t, torch.zeros_like(gates_t))
        ys[t], gates_all[t], cs[t] = y_t.to(dtype), gates_t.to(dtype), c
    y = torch.stack(ys) if T > 0 else xproj.new_zeros(0, B, h0.shape[1])
    if save:
        gates = torch.stack(gates_all)
        c_all = torch.stack(cs)
    else:
        gates = xproj.new_empty(0)
        c_all = xproj.new_empty(0, dtype=acc)
    return y, h.to(dtype), c.to(dtype), gates, c_all


def recurrence_backward_ref(
    dy: Tensor,
    dh_n: Tensor,
    dc_n: Tensor,
    w_hh: Tensor,
    w_hr: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    lengths: Optional[Tensor],
    reverse: bool,
    y: Tensor,
    gates: Tensor,
    c_all: Tensor,
):
    """Hand-written backward through time; the same math the kernels do."""
    T, B, H4 = gates.shape
    H = H4 // 4
    dtype, acc = y.dtype, acc_dtype(y.dtype)
    w_hh_a = w_hh.to(acc)
    w_hr_a = None if w_hr is None else w_hr.to(acc)
    dh = dh_n.to(acc)
    dc = dc_n.to(acc)
    c0_a = c0.to(acc)
    dgates_all = [None] * T
    dh_proj_all = [None] * T  # gradient reaching the projected h at each step, for dW_hr
    order = list(step_order(T, reverse))
    for s in reversed(range(T)):
        t = order[s]
        c_prev = c_all[order[s - 1]] if s > 0 else c0_a
        i, f, g, o = gates[t].to(acc).chunk(4, dim=1)
        c = c_all[t]
        act = active_mask(lengths, t, B, y.device)

        dh_tot = dh + dy[t].to(acc)
        if w_hr_a is not None:
            dh_proj_all[t] = dh_tot if act is None else torch.where(act, dh_tot, torch.zeros_like(dh_tot))
            dm = dh_tot @ w_hr_a
        else:
            dm = dh_tot
        tc = c.tanh()
        d_o = dm * tc
        dc_tot = dc + dm * o * (1 - tc * tc)
        d_i = dc_tot * g
        d_g = dc_tot * i
        d_f = dc_tot * c_prev
        dz = torch.cat(
            [d_i * i * (1 - i), d_f * f * (1 - f), d_g * (1 - g * g), d_o * o * (1 - o)], dim=1
        )
        dh_prev = dz @ w_hh_a
        dc_prev = dc_tot * f
        if act is None:
            dh, dc = dh_prev, dc_prev
        else:
            dz = torch.where(act, dz, torch.zeros_like(dz))
            dh = torch.where(act, dh_prev, dh)
            dc = torch.where(act, dc_prev, dc)
        dgates_all[t] = dz

    P = w_hh.shape[1]
    dxproj = torch.stack(dgates_all) if T > 0 else dy.new_zeros(0, B, H4, dtype=acc)
    h_prev = previous_hidden(y.to(acc), h0.to(acc), lengths, reverse)
    dw_hh = dxproj.reshape(T * B, H4).t() @ h_prev.reshape(T * B, P)
    if w_hr_a is not None:
        m_all = gates[..., 3 * H :].to(acc) * c_all.tanh()
        dh_proj = torch.stack(dh_proj_all)
        dw_hr = (dh_proj.reshape(T * B, P).t() @ m_all.reshape(T * B, H)).to(dtype)
    else:
        dw_hr = y.new_empty(0)
    return dxproj.to(dtype), dw_hh.to(dtype), dw_hr, dh.to(dtype), dc.to(dtype)
