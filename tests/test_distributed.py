"""Data-parallel training: DDP and FSDP2 over gloo on 2 CPU processes.

Each worker takes its half of one global batch; after backward its gradients (averaged across
ranks by DDP, reduce-scattered by FSDP2) must equal a single process's gradients on the whole
batch. The workers are spawned by the test and bounded by a generous timeout.
"""

import gc
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lstm_fused
from helpers import rel_error

WORLD_SIZE = 2
HANG_GUARD_S = 300  # only against a hung collective: a healthy run takes seconds
TOL = 1e-12  # float64: the two halves of the batch are summed in a different order

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = lstm_fused.LSTM(5, 8, num_layers=2, bidirectional=True, dtype=torch.float64)
        self.head = nn.Linear(16, 3, dtype=torch.float64)

    def forward(self, x):
        y, (h, c) = self.rnn(x)
        # The state enters the loss too, so every gradient path of the op is exercised.
        return self.head(y), h.sum(0) + c.sum(0)


def _loss(model, x, y_target, state_target):
    y, state = model(x)
    return ((y - y_target) ** 2).mean() + ((state - state_target) ** 2).mean()


def _draw_problem(path):
    model = Tagger()
    T, B = 7, 6  # B splits evenly: each rank's mean loss is half of the global mean's sum
    batch = (torch.randn(T, B, 5, dtype=torch.float64), torch.randn(T, B, 3, dtype=torch.float64),
             torch.randn(B, 8, dtype=torch.float64))
    torch.save({"state": model.state_dict(), "batch": batch}, path)
    return model, batch


def _local_grads(rank, mode, problem_path):
    """This rank's gradients after one backward on its half of the batch."""
    problem = torch.load(problem_path)
    model = Tagger()
    model.load_state_dict(problem["state"])
    x, y_target, state_target = problem["batch"]
    half = x.size(1) // WORLD_SIZE
    rows = slice(rank * half, (rank + 1) * half)
    local = (x[:, rows], y_target[:, rows], state_target[rows])
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
        _loss(wrapped, *local).backward()
        return {name: p.grad for name, p in model.named_parameters()}
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    fully_shard(model.rnn, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _loss(model, *local).backward()
    # Sharded DTensor gradients: gather every one (a collective, so on every rank).
    return {name: p.grad.full_tensor() for name, p in model.named_parameters()}


def _worker(rank, mode, store_path, problem_path, out_path):
    torch.set_num_threads(1)
    # A file store: no TCP port to find, and no store server living in one of the workers.
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=WORLD_SIZE, timeout=timedelta(seconds=120))
    try:
        # The DDP wrapper / device mesh live only inside _local_grads, so once it returns nothing
        # but the default group refers to the gloo process group.
        grads = _local_grads(rank, mode, problem_path)
        if rank == 0:
            torch.save(grads, out_path)
        # Neither rank tears down its connections while the other may still be receiving.
        dist.barrier()
    finally:
        # Destroying the last reference joins gloo's worker threads now. Left alive into
        # interpreter shutdown, a gloo thread that drops the last reference to a finished work
        # (which holds Python objects) aborts the process ("terminate called without an active
        # exception", seen in about 1 run of 50 with nn.LSTM as with ours; torch 2.13).
        dist.destroy_process_group()
        gc.collect()


def _run_workers(mode, store_path, problem_path, out_path):
    context = mp.start_processes(
        _worker, args=(mode, str(store_path), str(problem_path), str(out_path)),
        nprocs=WORLD_SIZE, join=False, start_method="spawn",
    )
    deadline = time.monotonic() + HANG_GUARD_S
    while not context.join(timeout=5):  # re-raises a worker's exception
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{mode} workers did not finish within {HANG_GUARD_S} s")


def _single_process_grads(model, batch):
    model.zero_grad(set_to_none=True)
    _loss(model, *batch).backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_data_parallel_grads_equal_single_process(mode, tmp_path):
    model, batch = _draw_problem(tmp_path / "problem.pt")
    expected = _single_process_grads(model, batch)
    _run_workers(mode, tmp_path / "store", tmp_path / "problem.pt", tmp_path / "grads.pt")
    got = torch.load(tmp_path / "grads.pt")
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        assert got[name].shape == grad.shape, name
        assert rel_error(got[name], grad) < TOL, name
