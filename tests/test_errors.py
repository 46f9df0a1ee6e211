"""Bad input fails with a sentence naming the problem, at least wherever nn.LSTM raises."""

import re

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_fused
from helpers import cpu_backends

BACKEND = cpu_backends()[0]


@pytest.fixture
def lstm():
    return lstm_fused.LSTM(4, 6, num_layers=2, backend=BACKEND)


def test_wrong_input_rank(lstm):
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D, got 4D"):
        lstm(torch.randn(2, 3, 4, 5))


def test_wrong_feature_size(lstm):
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size. Expected 4, got 5"):
        lstm(torch.randn(3, 2, 5))


def test_wrong_feature_size_packed(lstm):
    packed = pack_padded_sequence(torch.randn(3, 2, 5), torch.tensor([3, 2]))
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        lstm(packed)


@pytest.mark.parametrize("which,shape,msg", [
    ("h", (2, 3, 7), "Expected hidden\\[0\\] size \\(2, 3, 6\\), got \\[2, 3, 7\\]"),
    ("h", (1, 3, 6), "Expected hidden\\[0\\] size \\(2, 3, 6\\), got \\[1, 3, 6\\]"),
    ("c", (2, 4, 6), "Expected hidden\\[1\\] size \\(2, 3, 6\\), got \\[2, 4, 6\\]"),
])
def test_wrong_state_shape(lstm, which, shape, msg):
    h0, c0 = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    if which == "h":
        h0 = torch.randn(shape)
    else:
        c0 = torch.randn(shape)
    with pytest.raises(RuntimeError, match=msg):
        lstm(torch.randn(5, 3, 4), (h0, c0))


def test_state_rank_must_match_input(lstm):
    with pytest.raises(RuntimeError, match="hx and cx should also be 3-D"):
        lstm(torch.randn(5, 3, 4), (torch.randn(3, 6), torch.randn(3, 6)))
    with pytest.raises(RuntimeError, match="hx and cx should also be 2-D"):
        lstm(torch.randn(5, 4), (torch.randn(2, 1, 6), torch.randn(2, 1, 6)))


def test_input_dtype_mismatch(lstm):
    # nn.LSTM's own check raises; its wording changed between torch releases ("input dtype
    # (torch.float64) does not match weight dtype" in 2.13, "input must have the type
    # torch.float32, got type torch.float64" in 2.9), so expect what nn.LSTM raises here.
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError) as theirs:
        torch.nn.LSTM(4, 6, num_layers=2)(x)
    assert "float64" in str(theirs.value)
    with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
        lstm(x)


def test_state_dtype_mismatch(lstm):
    h0 = torch.randn(2, 3, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="h0 has dtype torch.float64 but input has dtype torch.float32"):
        lstm(torch.randn(5, 3, 4), (h0, torch.randn(2, 3, 6)))


def test_device_mismatch_is_named(lstm):
    meta_input = torch.randn(5, 3, 4, device="meta")
    with pytest.raises(RuntimeError, match="input is on meta but the module's parameters are on cpu"):
        lstm(meta_input)
    h0 = torch.randn(2, 3, 6, device="meta")
    with pytest.raises(RuntimeError, match="h0 is on meta"):
        lstm(torch.randn(5, 3, 4), (h0, torch.randn(2, 3, 6)))


def _raised(call):
    """(exception type, message) of what ``call`` raises."""
    with pytest.raises(Exception) as info:
        call()
    return type(info.value), str(info.value)


F64 = torch.float64

# id: nn.LSTM config, input, (h0, c0) or None; each must fail exactly as nn.LSTM fails
LSTM_LIKE_NN = {
    "empty_sequence": (dict(num_layers=2), lambda: torch.randn(0, 3, 4), None),
    "empty_sequence_batch_first": (dict(batch_first=True), lambda: torch.randn(3, 0, 4), None),
    "empty_sequence_unbatched": ({}, lambda: torch.randn(0, 4), None),
    "empty_sequence_with_state": ({}, lambda: torch.randn(0, 3, 4), lambda: (torch.randn(1, 3, 6), torch.randn(1, 3, 6))),
    "empty_sequence_state_shape_first": ({}, lambda: torch.randn(0, 3, 4),
                                         lambda: (torch.randn(1, 5, 6), torch.randn(1, 3, 6))),
    "empty_sequence_before_state_dtype": ({}, lambda: torch.randn(0, 3, 4),
                                          lambda: (torch.randn(1, 3, 6, dtype=F64), torch.randn(1, 3, 6))),
}  # fmt: skip


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", LSTM_LIKE_NN)
def test_lstm_fails_like_nn_lstm(backend, case):
    config, make_input, make_state = LSTM_LIKE_NN[case]
    ours = lstm_fused.LSTM(4, 6, **config, backend=backend)
    theirs = torch.nn.LSTM(4, 6, **config)
    x = make_input()
    hx = None if make_state is None else make_state()
    assert _raised(lambda: ours(x, hx)) == _raised(lambda: theirs(x, hx))


# id: input, (h, c) for an LSTMCell(4, 20); each must fail exactly as nn.LSTMCell fails
CELL_LIKE_NN = {
    "hidden0_size": (lambda: torch.randn(3, 4), lambda: (torch.randn(3, 21), torch.randn(3, 20))),
    "hidden1_size": (lambda: torch.randn(3, 4), lambda: (torch.randn(3, 20), torch.randn(3, 21))),
    "hidden0_batch": (lambda: torch.randn(3, 4), lambda: (torch.randn(5, 20), torch.randn(3, 20))),
    "hidden1_batch": (lambda: torch.randn(3, 4), lambda: (torch.randn(3, 20), torch.randn(5, 20))),
    "batch_before_size": (lambda: torch.randn(3, 4), lambda: (torch.randn(5, 21), torch.randn(5, 21))),
    "hidden0_before_hidden1": (lambda: torch.randn(3, 4), lambda: (torch.randn(3, 21), torch.randn(5, 20))),
    "unbatched_hidden_size": (lambda: torch.randn(4), lambda: (torch.randn(21), torch.randn(20))),
    "unbatched_input_batched_state": (lambda: torch.randn(4), lambda: (torch.randn(3, 20), torch.randn(3, 20))),
    "batched_input_unbatched_state": (lambda: torch.randn(3, 4), lambda: (torch.randn(20), torch.randn(20))),
    "shape_before_state_dtype": (lambda: torch.randn(3, 4), lambda: (torch.randn(5, 20, dtype=F64), torch.randn(5, 20))),
    "shape_before_input_dtype": (lambda: torch.randn(3, 4, dtype=F64), lambda: (torch.randn(3, 21), torch.randn(3, 20))),
    "input_size_before_dtype": (lambda: torch.randn(3, 5, dtype=F64), lambda: None),
}  # fmt: skip


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", CELL_LIKE_NN)
def test_cell_fails_like_nn_lstm_cell(backend, case):
    make_input, make_state = CELL_LIKE_NN[case]
    ours = lstm_fused.LSTMCell(4, 20, backend=backend)
    theirs = torch.nn.LSTMCell(4, 20)
    x, hx = make_input(), make_state()
    assert _raised(lambda: ours(x, hx)) == _raised(lambda: theirs(x, hx))


def test_cell_errors():
    cell = lstm_fused.LSTMCell(4, 6, backend=BACKEND)
    with pytest.raises(ValueError, match="Expected input to be 1D or 2D, got 3D"):
        cell(torch.randn(1, 2, 4))
    with pytest.raises(RuntimeError, match="inconsistent input_size: got 5 expected 4"):
        cell(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="Input batch size 2 doesn't match hidden1 batch size 3"):
        cell(torch.randn(2, 4), (torch.randn(2, 6), torch.randn(3, 6)))


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="C++ extension not built")
def test_op_level_checks_name_the_argument():
    op = torch.ops.lstm_fused.recurrence_forward
    xproj, w_hh = torch.randn(3, 2, 8), torch.randn(8, 2)
    h0, c0 = torch.randn(2, 2), torch.randn(2, 2)
    with pytest.raises(RuntimeError, match="w_hh must have shape \\[8, 2\\], got \\[8, 3\\]"):
        op(xproj, torch.randn(8, 3), None, h0, c0, None, False, False)
    with pytest.raises(RuntimeError, match="c0 has dtype Double but xproj has dtype Float"):
        op(xproj, w_hh, None, h0, c0.double(), None, False, False)
    with pytest.raises(RuntimeError, match="lengths must be int64"):
        op(xproj, w_hh, None, h0, c0, torch.tensor([1.0, 2.0]), False, False)
    with pytest.raises(RuntimeError, match="saved gates"):
        torch.ops.lstm_fused.recurrence_backward(
            torch.randn(3, 2, 2), h0, c0, w_hh, None, h0, c0, None, False,
            torch.randn(3, 2, 2), torch.empty(0), torch.empty(0), True)
