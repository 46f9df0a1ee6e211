"""Per-sample gradients through expanded weights (call_for_per_sample_grads), as nn.LSTM has them.

Each grad_sample is checked against nn.LSTM's own grad_sample where nn.LSTM supports it (float64),
and against the plain definition (a backward per sample through nn.LSTM / nn.LSTMCell) elsewhere.
"""

import pytest
import torch
from torch import nn
from torch.nn.utils._per_sample_grad import call_for_per_sample_grads
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_fused
from helpers import cpu_backends, rel_error

F64 = torch.float64

# id: nn.LSTM config, T, B, lengths (None: a plain tensor)
CASES = {
    "batch_first": (dict(input_size=3, hidden_size=4, batch_first=True), 4, 3, None),
    "time_major": (dict(input_size=3, hidden_size=4), 4, 3, None),
    "2layers_bidir_proj": (dict(input_size=2, hidden_size=4, num_layers=2, bidirectional=True, proj_size=3,
                                batch_first=True), 3, 3, None),
    "packed_unsorted": (dict(input_size=3, hidden_size=4), 5, 3, [2, 5, 3]),
}  # fmt: skip


def _pair(backend, config, dtype):
    oracle = nn.LSTM(**config, dtype=dtype)
    fused = lstm_fused.LSTM(**config, backend=backend, dtype=dtype)
    fused.load_state_dict(oracle.state_dict())
    return oracle, fused


def _inputs(config, T, B, lengths, dtype):
    batch_first = config.get("batch_first", False)
    x = torch.randn(*((B, T) if batch_first else (T, B)), config["input_size"], dtype=dtype)
    if lengths is None:
        return x
    return pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False)


def _per_sample_grads(module, inp, batch_size, batch_first):
    module.zero_grad(set_to_none=True)
    out, (h_n, c_n) = call_for_per_sample_grads(module, batch_size=batch_size, batch_first=batch_first)(inp)
    y = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    # Per-sample losses summed; each sample's terms depend on that sample only.
    (y.pow(2).sum() + h_n.sin().sum() + c_n.pow(2).sum()).backward()
    return {name: p.grad_sample for name, p in module.named_parameters()}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", CASES)
def test_lstm_per_sample_grads_match_nn_lstm(backend, case):
    config, T, B, lengths = CASES[case]
    oracle, fused = _pair(backend, config, F64)
    inp = _inputs(config, T, B, lengths, F64)
    # A PackedSequence hides its batch size from call_for_per_sample_grads' inference.
    batch_size = None if lengths is None else B
    batch_first = config.get("batch_first", False)
    want = _per_sample_grads(oracle, inp, batch_size, batch_first)
    got = _per_sample_grads(fused, inp, batch_size, batch_first)
    for name, g in want.items():
        assert got[name].shape == (B, *getattr(fused, name).shape), name
        assert rel_error(got[name], g) <= 1e-10, name


def _loop_over_samples(module, x, hx_of_sample):
    """The definition: one backward per sample, through the module on that sample alone."""
    grads = {name: [] for name, _ in module.named_parameters()}
    for b in range(x.shape[0]):
        module.zero_grad(set_to_none=True)
        out = module(x[b : b + 1], hx_of_sample(b))
        h, c = out if isinstance(module, nn.LSTMCell) else out[1]
        y = h if isinstance(module, nn.LSTMCell) else out[0]
        (y.pow(2).sum() + c.pow(2).sum()).backward()
        for name, p in module.named_parameters():
            grads[name].append(p.grad)
    return {name: torch.stack(g) for name, g in grads.items()}


@pytest.mark.parametrize("backend", cpu_backends())
def test_lstm_per_sample_grads_fp32_without_input_grad(backend):
    # nn.LSTM itself fails here in torch 2.13 (its decomposition picks a oneDNN op that expanded
    # weights cannot handle); ours must match the per-sample definition.
    config = dict(input_size=3, hidden_size=5, batch_first=True)
    oracle, fused = _pair(backend, config, torch.float32)
    x = torch.randn(4, 6, 3)
    fused.zero_grad(set_to_none=True)
    y, (_, c_n) = call_for_per_sample_grads(fused)(x)
    (y.pow(2).sum() + c_n.pow(2).sum()).backward()
    want = _loop_over_samples(oracle, x, lambda b: None)
    for name, p in fused.named_parameters():
        assert rel_error(p.grad_sample, want[name]) <= 2e-5, name


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("given_state", [False, True], ids=["no_hx", "hx"])
def test_cell_per_sample_grads_match_per_sample_loop(backend, given_state):
    oracle = nn.LSTMCell(3, 4, dtype=F64)
    fused = lstm_fused.LSTMCell(3, 4, backend=backend, dtype=F64)
    fused.load_state_dict(oracle.state_dict())
    x, h0, c0 = torch.randn(5, 3, dtype=F64), torch.randn(5, 4, dtype=F64), torch.randn(5, 4, dtype=F64)
    fused.zero_grad(set_to_none=True)
    h, c = call_for_per_sample_grads(fused)(x, (h0, c0) if given_state else None)
    (h.pow(2).sum() + c.pow(2).sum()).backward()
    want = _loop_over_samples(oracle, x, lambda b: (h0[b : b + 1], c0[b : b + 1]) if given_state else None)
    for name, p in fused.named_parameters():
        assert rel_error(p.grad_sample, want[name]) <= 1e-10, name


def test_cell_unbatched_input_with_expanded_weights_keeps_nn_shapes():
    fused = lstm_fused.LSTMCell(3, 4, backend=cpu_backends()[0], dtype=F64)
    h, c = call_for_per_sample_grads(fused, batch_size=1)(torch.randn(3, dtype=F64))
    assert h.shape == (4,) and c.shape == (4,)
