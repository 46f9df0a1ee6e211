"""The weight gradients on our own kernels (csrc/cpu/weight_grads.cpp): the op
``lstm_fused::weight_grad`` (g^T @ x over all rows) against float64 on every instruction-set
variant this machine runs, over shapes that take every edge of its blocking; that the LSTM's
weight gradients use it exactly when our own float32 product is chosen is in
test_input_projection.py (test_lstm_matches_float64_with_either_gemm runs both choices)."""

import pytest
import torch

import lstm_fused
from lstm_fused import ops
from helpers import rel_error, supported_cpu_variants

pytestmark = pytest.mark.skipif("cpu" not in lstm_fused.available_backends(),
                                reason="the C++ extension is not built")

# (id, M, N, I): M the reduction (T*B rows), N the rows of the result (4H), I its columns.
# Partial row tiles (N = 13, 1), partial column vectors (I = 5, 33, 130), a last chunk of columns
# one, two or three vectors wide (I = 20 and 44 end in 3 and 2 of 8-lane vectors, in 2 and 3 of
# 16-lane ones; their tiles skip the vectors past I), reductions of one row,
# of less than one chunk and of several chunks with a partial last one (a chunk is 48-192 rows,
# by the L1 and the vector width), work enough for two threads, and 3000 rows of the result per
# thread, more than one block of them holds (a block's packed g^T takes half of one core's L2:
# 1362 rows on a 1 MB L2 with 96-row chunks, 2730 on 2 MB) on the machines we run.
CASES = [
    ("one_of_each", 1, 1, 1),
    ("partial_tiles", 7, 13, 5),
    ("one_row", 1, 24, 70),
    ("several_chunks", 700, 50, 33),
    ("two_threads", 480, 256, 96),
    ("narrow_columns", 300, 40, 20),
    ("three_vector_columns", 300, 40, 44),
    ("several_row_blocks", 200, 6000, 130),
]


def _draw(M, N, I):
    return torch.randn(M, N, dtype=torch.float64), torch.randn(M, I, dtype=torch.float64)


@pytest.mark.parametrize("variant", supported_cpu_variants())
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_float64(monkeypatch, variant, case):
    monkeypatch.setenv("LSTM_FUSED_CPU_ISA", variant)
    _, M, N, I = case
    g, x = _draw(M, N, I)
    got = torch.ops.lstm_fused.weight_grad(g.float(), x.float())
    assert got.shape == (N, I) and got.dtype == torch.float32
    assert rel_error(got, g.t() @ x) <= 2e-6


@pytest.mark.parametrize("variant", supported_cpu_variants())
def test_rows_with_a_stride_and_an_empty_reduction(monkeypatch, variant):
    monkeypatch.setenv("LSTM_FUSED_CPU_ISA", variant)
    g, x = _draw(150, 90, 60)
    # Column slices: rows of g and x further apart than their widths.
    gs, xs = g.float()[:, 10:75], x.float()[:, 3:40]
    assert gs.stride(0) == 90 and xs.stride(0) == 60
    assert rel_error(torch.ops.lstm_fused.weight_grad(gs, xs), g[:, 10:75].t() @ x[:, 3:40]) <= 2e-6
    # No rows: a zero result, as g.t() @ x gives (never the memory it was allocated in).
    empty = torch.ops.lstm_fused.weight_grad(torch.empty(0, 20), torch.empty(0, 7))
    assert empty.shape == (20, 7) and torch.equal(empty, torch.zeros(20, 7))


def test_bad_arguments_are_errors():
    g, x = torch.randn(5, 8), torch.randn(5, 3)
    with pytest.raises(RuntimeError, match="2-D float32 CPU tensors with contiguous rows"):
        torch.ops.lstm_fused.weight_grad(g.double(), x)
    with pytest.raises(RuntimeError, match="2-D float32 CPU tensors with contiguous rows"):
        torch.ops.lstm_fused.weight_grad(g, x.t().contiguous().t())
    with pytest.raises(RuntimeError, match="2-D float32 CPU tensors with contiguous rows"):
        torch.ops.lstm_fused.weight_grad(g[0], x)
    with pytest.raises(RuntimeError, match="do not give out"):
        torch.ops.lstm_fused.weight_grad(g, torch.randn(4, 3))


def test_opcheck():
    torch.library.opcheck(torch.ops.lstm_fused.weight_grad.default, (torch.randn(9, 12), torch.randn(9, 5)))


def test_the_ops_follow_set_own_gemm(set_own_gemm):
    for own in (True, False):
        set_own_gemm(own)
        assert [torch.ops.lstm_fused.cpu_own_gemm(d) for d in ops.OWN_GEMM_DTYPES] == [own] * 3
    set_own_gemm(True, torch.float16)
    assert [torch.ops.lstm_fused.cpu_own_gemm(d) for d in ops.OWN_GEMM_DTYPES] == [False, False, True]
