"""Variable-length input: PackedSequence in and out, handled inside the recurrence op."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from helpers import cpu_backends, make_pair, rel_error

CONFIGS = [
    ("uni", {}),
    ("bidir", {"bidirectional": True}),
    ("2layers_bidir_proj", {"num_layers": 2, "bidirectional": True, "proj_size": 3}),
    ("threads_bidir", {"bidirectional": True, "hidden_size": 48}),
    ("threads_proj", {"proj_size": 33, "hidden_size": 64}),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_packed_parity(backend, enforce_sorted, config, dtype):
    extra = dict(config[1])
    I, H, B, T = 5, extra.pop("hidden_size", 7), 6, 9
    oracle, fused = make_pair(dtype, backend, input_size=I, hidden_size=H, **extra)
    lengths = torch.tensor([9, 7, 7, 4, 2, 1]) if enforce_sorted else torch.tensor([4, 9, 1, 7, 2, 7])
    x = torch.randn(T, B, I, dtype=torch.float64)
    L = oracle.num_layers * (2 if oracle.bidirectional else 1)
    P = oracle.proj_size or H
    hx = (torch.randn(L, B, P, dtype=torch.float64), torch.randn(L, B, H, dtype=torch.float64))

    results = []
    for module, dt in ((oracle, torch.float64), (fused, dtype)):
        xi = x.detach().to(dt).clone().requires_grad_()
        hi = tuple(t.detach().to(dt).clone().requires_grad_() for t in hx)
        packed = pack_padded_sequence(xi, lengths, enforce_sorted=enforce_sorted)
        out, (h_n, c_n) = module(packed, hi)
        assert isinstance(out, nn.utils.rnn.PackedSequence)
        assert torch.equal(out.batch_sizes, packed.batch_sizes)
        padded, out_lengths = pad_packed_sequence(out)
        assert torch.equal(out_lengths, lengths)
        g = torch.Generator().manual_seed(1)
        loss = (out.data * torch.randn(out.data.shape, generator=g, dtype=torch.float64).to(dt)).sum()
        loss = loss + (h_n * 2).sum() + (c_n * 3).sum()
        loss.backward()
        grads = [xi.grad, hi[0].grad, hi[1].grad] + [p.grad for p in module.parameters()]
        results.append((padded, h_n, c_n, grads))
    (y64, h64, c64, g64), (y, h, c, g) = results
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    assert rel_error(y, y64) < tol
    assert rel_error(h, h64) < tol
    assert rel_error(c, c64) < tol
    for i, (a, b) in enumerate(zip(g, g64)):
        assert rel_error(a, b) < tol, f"gradient {i}"
    # Past each sequence's end the padded output is exactly zero, as with nn.LSTM.
    for b, n in enumerate(lengths.tolist()):
        assert torch.all(y[n:, b] == 0)
