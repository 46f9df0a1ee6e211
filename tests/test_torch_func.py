"""torch.func transforms (grad, vmap, jvp) over our modules, as over nn.LSTM / nn.LSTMCell.

functorch cannot transform our ops' autograd (torch.library's Autograd kernels), so under a
transform the modules run nn's own computation on their parameters: the same values as nn's, bit
for bit, with every backend; outside a transform our ops run as always."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

import lstm_fused
from helpers import cpu_backends, op_calls

CONFIGS = {
    "lstm": (nn.LSTM, lstm_fused.LSTM, dict(input_size=6, hidden_size=8, num_layers=2, bidirectional=True)),
    "cell": (nn.LSTMCell, lstm_fused.LSTMCell, dict(input_size=6, hidden_size=8)),
}


def _pair(kind, backend):
    nn_cls, ours_cls, config = CONFIGS[kind]
    native = nn_cls(**config)
    fused = ours_cls(**config, backend=backend)
    fused.load_state_dict(native.state_dict())
    return native, fused


def _loss(module, kind):
    """loss(params, x) for an LSTM, loss(params, x, h0, c0) for a cell (nn.LSTMCell's own zero
    state cannot be batched by vmap)."""
    def loss(params, x, *hx):
        out = functional_call(module, params, (x, tuple(hx)) if hx else (x,))
        y = out[0] if kind == "lstm" else out[0] + 2 * out[1]
        return (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum()
    return loss


def _sample(kind, n=None):
    """One input for a batch of 2 (a cell's with its state), or n of them stacked for vmap."""
    shapes = [(5, 2, 6)] if kind == "lstm" else [(2, 6), (2, 8), (2, 8)]
    return tuple(torch.randn(shape if n is None else (n, *shape)) for shape in shapes)


def _params(module):
    return {k: v.detach() for k, v in module.named_parameters()}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", CONFIGS)
def test_grad_and_per_sample_grads_match_nn(kind, backend):
    native, fused = _pair(kind, backend)
    x, xs = _sample(kind), _sample(kind, n=3)
    want = grad(_loss(native, kind))(_params(native), *x)
    got = grad(_loss(fused, kind))(_params(fused), *x)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    in_dims = (None,) + (0,) * len(xs)
    per_sample = lambda m: vmap(grad(_loss(m, kind)), in_dims=in_dims)(_params(m), *xs)
    want, got = per_sample(native), per_sample(fused)
    for k in want:
        assert got[k].shape == (3, *fused.get_parameter(k).shape)
        assert torch.equal(got[k], want[k]), k


# Forward mode: nn.LSTMCell has it (nn.LSTM's oneDNN layer op does not, so neither has ours).
def test_jvp_of_a_cell_matches_nn():
    native, fused = _pair("cell", "cpu")
    x, tangent = _sample("cell"), _sample("cell")
    outs = [jvp(lambda *x_: _loss(m, "cell")(_params(m), *x_), x, tangent) for m in (native, fused)]
    assert torch.equal(outs[1][0], outs[0][0]) and torch.equal(outs[1][1], outs[0][1])


def test_our_ops_run_outside_a_transform():
    _, fused = _pair("lstm", "cpu")
    x = _sample("lstm")[0].requires_grad_()
    assert op_calls("lstm_fused::bidirectional_forward", lambda: fused(x)[0].sum().backward()) == 2
