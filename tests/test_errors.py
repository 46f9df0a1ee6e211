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


def test_empty_sequence(lstm):
    with pytest.raises(RuntimeError, match="length 0"):
        lstm(torch.randn(0, 3, 4))


def test_cell_errors():
    cell = lstm_fused.LSTMCell(4, 6, backend=BACKEND)
    with pytest.raises(ValueError, match="Expected input to be 1D or 2D, got 3D"):
        cell(torch.randn(1, 2, 4))
    with pytest.raises(RuntimeError, match="inconsistent input_size: got 5 expected 4"):
        cell(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="Expected hx\\[1\\] of size \\(2, 6\\)"):
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
