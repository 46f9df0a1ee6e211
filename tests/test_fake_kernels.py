"""The fake kernels of the CPU ops (lstm_fused/ops.py) against the real ops, by opcheck: shapes,
dtypes and strides of every output, with weights and states laid out as callers may pass them,
transposed views included. A fake that copied an input's strides (empty_like) where the kernel
writes a contiguous output broke a compiled batch-first model's backward."""

import pytest
import torch

import lstm_fused
from helpers import cpu_backends

pytestmark = pytest.mark.skipif("cpu" not in lstm_fused.available_backends(),
                                reason="the C++ extension is not built")

OPS = torch.ops.lstm_fused
LAYOUTS = ["contiguous", "transposed"]


def _laid_out(t, layout):
    """t's values; "transposed": dense, with the strides of its last two dims swapped."""
    if t is None or layout == "contiguous":
        return t
    out = t.mT.contiguous().mT
    assert torch.equal(out, t) and not out.is_contiguous()
    return out


def _layer_weights(I, H, layout):
    """w_ih (4H, I), w_hh (4H, H), b_ih, b_hh."""
    return [_laid_out(torch.randn(4 * H, I) / I**0.5, layout), _laid_out(torch.randn(4 * H, H) / H**0.5, layout),
            torch.randn(4 * H), torch.randn(4 * H)]


def _state(n, B, H, layout):
    return _laid_out(torch.randn(n, B, H), layout), _laid_out(torch.randn(n, B, H), layout)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("proj", [False, True], ids=["plain", "proj"])
def test_recurrence_ops(backend, layout, proj):
    T, B, H = 3, 4, 5
    P = 3 if proj else H
    fwd = getattr(OPS, f"{'recurrence' if backend == 'cpu' else 'reference'}_forward").default
    bwd = getattr(OPS, f"{'recurrence' if backend == 'cpu' else 'reference'}_backward").default
    xproj = torch.randn(T, B, 4 * H)
    w_hh = _laid_out(torch.randn(4 * H, P) / P**0.5, layout)
    w_hr = _laid_out(torch.randn(P, H) / H**0.5, layout) if proj else None
    h0, c0 = (_laid_out(torch.randn(B, n), layout) for n in (P, H))
    torch.library.opcheck(fwd, (xproj, w_hh, w_hr, h0, c0, None, False, True))
    y, h_n, c_n, gates, c_all = fwd(xproj, w_hh, w_hr, h0, c0, None, False, True)
    for weight_grads in (True, False):
        torch.library.opcheck(bwd, (torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n), w_hh, w_hr,
                                    h0, c0, None, False, y, gates, c_all, weight_grads))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bidirectional_ops(layout):
    T, B, H = 3, 4, 8
    xf, xr = torch.randn(T, B, 4 * H), torch.randn(T, B, 4 * H)
    wf, wr = (_laid_out(torch.randn(4 * H, H) / H**0.5, layout) for _ in range(2))
    h0, c0 = _state(2, B, H, layout)
    torch.library.opcheck(OPS.bidirectional_forward.default, (xf, xr, wf, wr, h0, c0, None, True))
    y, h_n, c_n, gates, c_all = OPS.bidirectional_forward(xf, xr, wf, wr, h0, c0, None, True)
    for weight_grads in (True, False):
        torch.library.opcheck(OPS.bidirectional_backward.default,
                              (torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n), wf, wr,
                               h0, c0, None, y, gates, c_all, weight_grads))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cell_forward(layout):
    B, I, H = 4, 6, 5
    w_ih, w_hh, b_ih, b_hh = _layer_weights(I, H, layout)
    h0, c0 = (s[0] for s in _state(1, B, H, layout))
    torch.library.opcheck(OPS.cell_forward.default, (torch.randn(B, I), h0, c0, w_ih, w_hh, b_ih, b_hh))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["one_dir", "bidir"])
def test_stacked_cell_forward(layout, bidirectional):
    B, I, H, L = 3, 6, 5, 2
    D = 2 if bidirectional else 1
    weights = [w for layer in range(L) for _ in range(D) for w in _layer_weights(I if layer == 0 else D * H, H, layout)]
    h0, c0 = _state(L * D, B, H, layout)
    torch.library.opcheck(OPS.stacked_cell_forward.default,
                          (torch.randn(B, I), h0, c0, weights, L, bidirectional, True))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_wavefront_forward(layout):
    T, B, I, H, L = 5, 2, 6, 8, 3
    weights = [w for layer in range(L) for w in _layer_weights(I if layer == 0 else H, H, layout)]
    h0, c0 = _state(L, B, H, layout)
    torch.library.opcheck(OPS.wavefront_forward.default, (torch.randn(T, B, I), h0, c0, weights, L, True))
