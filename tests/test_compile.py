"""torch.compile(fullgraph=True) traces through the module and the custom ops without breaks."""

import pytest
import torch
from torch import nn

import lstm_fused
from helpers import cpu_backends, rel_error


class Tagger(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.rnn = lstm_fused.LSTM(8, 12, num_layers=2, bidirectional=True, batch_first=True, backend=backend)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        y, (h, c) = self.rnn(torch.tanh(self.embed(x)))
        return self.head(y), h.sum() + c.sum()


@pytest.mark.parametrize("backend", cpu_backends())
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    model = Tagger(backend)
    x = torch.randn(3, 7, 6)
    eager_out, eager_aux = model(x)
    (eager_out.sum() + eager_aux).backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out, aux = compiled(x)
    (out.sum() + aux).backward()
    assert rel_error(out, eager_out) < 1e-6
    assert rel_error(aux, eager_aux) < 1e-6
    for g, e in zip([p.grad for p in model.parameters()], eager_grads):
        assert rel_error(g, e) < 1e-5


def test_compile_inference_with_inductor():
    torch._dynamo.reset()
    model = Tagger(cpu_backends()[0]).eval()
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        expected = model(x)[0]
        got = torch.compile(model, fullgraph=True)(x)[0]
    assert rel_error(got, expected) < 1e-5


# A streaming step without autograd runs the whole stack as one op (stacked_cell_forward): its
# fake kernel must give the shapes the real one does, under aot_eager and inductor alike.
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_one_step_stack(compile_backend):
    torch._dynamo.reset()
    model = lstm_fused.LSTM(8, 12, num_layers=2, bidirectional=True, backend="cpu").eval()
    x = torch.randn(1, 3, 8)
    hx = (torch.randn(4, 3, 12), torch.randn(4, 3, 12))
    with torch.no_grad():
        want_y, (want_h, want_c) = model(x, hx)
        got_y, (got_h, got_c) = torch.compile(model, fullgraph=True, backend=compile_backend)(x, hx)
    assert got_y.shape == want_y.shape == (1, 3, 24)
    for got, want in ((got_y, want_y), (got_h, want_h), (got_c, want_c)):
        assert rel_error(got, want) < 1e-6
