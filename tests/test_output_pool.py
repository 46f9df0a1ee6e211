"""The CPU backend's pool of large outputs (csrc/cpu/output_pool.h).

Blocks that the ops' tensors free wait in the pool and back the next call's outputs of about that
size. A reused block still holds whatever its last tensor held, so every test here poisons the
outputs with NaN before freeing them, and the next call must give exactly the fresh results. The
idle blocks stay under LSTM_FUSED_CPU_POOL_MB (read on every allocation and free).
"""

import math

import pytest
import torch

import lstm_fused

OPS = torch.ops.lstm_fused
pytestmark = pytest.mark.skipif("cpu" not in lstm_fused.available_backends(),
                                reason="the C++ extension is not built")

# The saved gates, the input projection and dxproj are T*B*4H floats: 5 MB, each in a block of
# whole huge pages (6 MB); y and c_all (1.25 MB) and dW_hh (1 MB) take blocks of 64 KB multiples;
# h_n and c_n (16 KB) are under the pool's minimum (kMinPooledBytes, 128 KB).
T, B, H = 80, 16, 256
MB = 1 << 20
KB = 1 << 10


def _stats():
    idle_bytes, idle_blocks, reused, mapped = OPS.cpu_output_pool_stats()
    return dict(idle_bytes=idle_bytes, idle_blocks=idle_blocks, reused=reused, mapped=mapped)


def _clear():
    # Packed weight panels come from the pool too: the cache's entries (of earlier tests' weights
    # among them) go first, so that their blocks are not counted as idle or reused here.
    OPS.cpu_packed_cache_clear()
    OPS.cpu_output_pool_clear()


@pytest.fixture
def one_thread():
    # Each thread of a weight-gradient product takes a scratch block from the pool: on one thread
    # a call's count of blocks does not depend on how many helpers joined it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _empty_pool(monkeypatch):
    monkeypatch.delenv("LSTM_FUSED_CPU_POOL_MB", raising=False)
    _clear()
    yield
    _clear()


def _inputs(dtype=torch.float32, steps=T):
    torch.manual_seed(0)
    x = torch.randn(steps, B, H)
    w_ih = torch.randn(4 * H, H) / math.sqrt(H)
    w_hh = torch.randn(4 * H, H) / math.sqrt(H)
    b_ih, b_hh = torch.randn(4 * H) * 0.1, torch.randn(4 * H) * 0.1
    h0, c0 = torch.randn(B, H), torch.randn(B, H)
    return [t.to(dtype) for t in (x, w_ih, w_hh, b_ih, b_hh, h0, c0)]


def _training_step(inputs, lengths=None, reverse=False):
    """Projection, forward with saved activations and backward, as the module's training runs them."""
    x, w_ih, w_hh, b_ih, b_hh, h0, c0 = inputs
    xproj = OPS.input_projection(x, w_ih, b_ih, b_hh)
    y, h_n, c_n, gates, c_all = OPS.recurrence_forward(xproj, w_hh, None, h0, c0, lengths, reverse, True)
    dy = torch.full_like(y, 0.01)
    dxproj, dw_hh, _, dh0, dc0 = OPS.recurrence_backward(
        dy, h_n, c_n, w_hh, None, h0, c0, lengths, reverse, y, gates, c_all, True
    )
    return [xproj, y, h_n, c_n, gates, c_all, dxproj, dw_hh, dh0, dc0]


# Padded rows (lengths) are the outputs a kernel writes differently: zeros, carried state.
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reused_blocks_give_the_fresh_results(dtype, padded, one_thread):
    steps = T * 4 // dtype.itemsize  # 5 MB of gates in either dtype
    inputs = _inputs(dtype, steps)
    lengths = torch.randint(1, steps + 1, (B,)) if padded else None
    step = lambda: _training_step(inputs, lengths, reverse=padded)
    start = _stats()  # reused and mapped count from the start of the process
    first = step()
    want = [t.clone() for t in first]
    # xproj, gates, dxproj at least (the weight gradients' scratch blocks are freed and taken
    # again within the step, so blocks are reused from the first step on).
    assert _stats()["mapped"] - start["mapped"] >= 3
    for t in first:
        t.fill_(float("nan"))
    del first
    freed = _stats()
    assert freed["idle_blocks"] >= 3 and freed["idle_bytes"] >= 3 * 5 * MB

    again = step()
    after = _stats()
    assert after["reused"] - freed["reused"] >= 3 and after["mapped"] == freed["mapped"]
    for name, got, expected in zip(["xproj", "y", "h_n", "c_n", "gates", "c_all", "dxproj", "dw_hh", "dh0", "dc0"],
                                   again, want):  # fmt: skip
        assert torch.equal(got, expected), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_aten_product_writes_into_a_pooled_block(dtype):
    # input_projection with ATen's GEMM (own_product=False) projects into a pool block too.
    steps = T * 4 // dtype.itemsize  # a 5 MB output in either dtype
    x, w_ih, _, b_ih, b_hh, *_ = _inputs(dtype, steps)
    first = OPS.input_projection(x, w_ih, b_ih, b_hh, False)
    want = first.clone()
    assert torch.equal(want, torch.nn.functional.linear(x, w_ih, b_ih + b_hh))
    first.fill_(float("nan"))
    del first
    freed = _stats()
    assert freed["idle_blocks"] == 1
    again = OPS.input_projection(x, w_ih, b_ih, b_hh, False)
    after = _stats()
    assert after["reused"] == freed["reused"] + 1 and after["mapped"] == freed["mapped"]
    assert torch.equal(again, want)


def test_weight_gradients_come_from_the_pool():
    # A training step's weight gradients live until autograd has added them into .grad: pooled,
    # the next step's land in memory already mapped (see output_pool.h).
    x, w_ih, *_ = _inputs()
    g = torch.randn(T, B, 4 * H)
    _, first, _ = OPS.input_projection_backward(g, x, w_ih, False, True)
    want = first.clone()
    assert torch.allclose(want, g.reshape(-1, 4 * H).t() @ x.reshape(-1, H), rtol=1e-4, atol=1e-3)
    block = first.data_ptr()
    first.fill_(float("nan"))
    del first
    _, again, _ = OPS.input_projection_backward(g, x, w_ih, False, True)
    # The same block (the only idle one of its size: the per-thread scratch blocks are smaller),
    # not fresh memory; how many scratch blocks a call takes depends on how many threads came.
    assert again.data_ptr() == block
    assert torch.equal(again, want)


def test_small_blocks_are_64_kb_multiples_and_tiny_outputs_are_not_pooled():
    x, w_ih, *_ = _inputs()
    rows = x.reshape(-1, H)
    out = OPS.input_projection(rows[:100], w_ih, None, None)  # 100 x 1024 floats: 400 KB
    assert out.numel() * 4 == 400 * KB
    start = _stats()
    del out
    assert _stats()["idle_blocks"] == start["idle_blocks"] + 1
    assert _stats()["idle_bytes"] == start["idle_bytes"] + 448 * KB  # the next 64 KB multiple
    tiny = OPS.input_projection(rows[:8], w_ih, None, None)  # 8 x 1024 floats: 32 KB
    del tiny
    assert _stats()["idle_blocks"] == start["idle_blocks"] + 1


def test_a_cap_of_zero_keeps_nothing(monkeypatch):
    monkeypatch.setenv("LSTM_FUSED_CPU_POOL_MB", "0")
    start = _stats()
    outputs = _training_step(_inputs())
    assert _stats()["mapped"] - start["mapped"] >= 3
    del outputs
    assert _stats()["idle_bytes"] == 0 and _stats()["idle_blocks"] == 0


def test_idle_blocks_stay_under_the_cap(monkeypatch):
    # Each 5 MB output takes a 6 MB block (whole huge pages); a 7 MB cap holds one of them.
    monkeypatch.setenv("LSTM_FUSED_CPU_POOL_MB", "7")
    outputs = _training_step(_inputs())
    del outputs
    idle = _stats()
    assert idle["idle_blocks"] == 1 and idle["idle_bytes"] == 6 * MB


def test_a_block_is_only_reused_for_a_similar_size():
    x, w_ih, *_ = _inputs()
    small = OPS.input_projection(x, w_ih, None, None)  # 5 MB: a 6 MB block
    del small
    start = _stats()
    # Twice the rows: a 10 MB output does not fit the idle 6 MB block, so a new one is mapped.
    big = OPS.input_projection(torch.cat([x, x]), w_ih, None, None)
    now = _stats()
    assert now["reused"] == start["reused"] and now["mapped"] == start["mapped"] + 1 and now["idle_blocks"] == 1
    expected = torch.nn.functional.linear(torch.cat([x, x]), w_ih)
    assert torch.allclose(big, expected, rtol=1e-5, atol=1e-5)


def test_pooled_outputs_are_ordinary_resizable_tensors():
    x, w_ih, *_ = _inputs()
    out = OPS.input_projection(x, w_ih, None, None)
    want = out.clone()
    out.resize_(2 * T, B, 4 * H)  # grows the storage through the pool's allocator
    assert torch.equal(out[:T], want)
    out[T:] = 1.0
    assert out.sum().isfinite()


def test_a_bad_cap_fails_the_call(monkeypatch):
    x, w_ih, *_ = _inputs()
    monkeypatch.setenv("LSTM_FUSED_CPU_POOL_MB", "lots")
    with pytest.raises(RuntimeError, match="LSTM_FUSED_CPU_POOL_MB=lots is not a size"):
        OPS.input_projection(x, w_ih, None, None)


def _projection_in_child(conn):
    torch.set_num_threads(1)  # as DataLoader workers run
    x, w_ih, *_ = _inputs()
    conn.send(OPS.input_projection(x, w_ih, None, None).double().sum().item())


def test_a_forked_child_uses_the_pool():
    import multiprocessing

    x, w_ih, *_ = _inputs()
    want = OPS.input_projection(x, w_ih, None, None)
    want_sum = want.double().sum().item()
    del want  # an idle block the child inherits
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    worker = ctx.Process(target=_projection_in_child, args=(child,))
    worker.start()
    assert parent.poll(120), "the forked child did not answer"
    got = parent.recv()
    worker.join(30)
    assert worker.exitcode == 0 and got == want_sum
