"""Two gloo processes, each holding half of a batch, reproduce the single-process loss and gradients."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from retriever.distributed import all_gather_with_grad, gather_batch
from retriever.losses import RetrievalBatch, build_loss

WORLD = 2
STEP, RAMP = 2, 4  # sparse FLOPS weights at (2/4)² of their maximum
# (objective, paradigm, score_scale)
CASES = [("cl", "dense", 100.0), ("cl+kd", "dense", 100.0), ("cl+kd", "sparse", 1.0), ("kd", "sparse", 1.0)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    queries = torch.rand(4, 6, generator=g, dtype=torch.float64)  # non-negative, like sparse vectors
    passages = torch.rand(4, 1 + 3, 6, generator=g, dtype=torch.float64)
    teacher = torch.randn(4, 1 + 3, generator=g, dtype=torch.float64) * 3
    return queries, passages, teacher


def _loss_and_grads(
    queries: torch.Tensor, passages: torch.Tensor, teacher: torch.Tensor, objective: str, paradigm: str, scale: float
) -> dict[str, torch.Tensor]:
    q = queries.clone().requires_grad_()
    p = passages.clone().requires_grad_()
    batch = gather_batch(RetrievalBatch(q, p, teacher, scale))
    out = build_loss(objective, paradigm, ramp_steps=RAMP)(batch, STEP)
    out.total.backward()
    assert q.grad is not None and p.grad is not None
    return {
        "total": out.total.detach(),
        "q_grad": q.grad,
        "p_grad": p.grad,
        **{k: v.detach() for k, v in out.parts.items()},
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        queries, passages, teacher = _global_data()
        half = queries.shape[0] // WORLD
        rows = slice(rank * half, (rank + 1) * half)
        results: dict[str, object] = {}
        for objective, paradigm, scale in CASES:
            results[f"{objective}/{paradigm}"] = _loss_and_grads(
                queries[rows], passages[rows], teacher[rows], objective, paradigm, scale
            )
        # a tensor without grad comes back as the plain concatenation
        results["gathered"] = all_gather_with_grad(torch.full((1, 2), float(rank), dtype=torch.float64))
        # mismatches fail on every rank with a clear message instead of hanging
        errors: dict[str, str] = {}
        try:
            all_gather_with_grad(torch.zeros(rank + 1, 3))
        except ValueError as e:
            errors["uneven"] = str(e)
        try:
            gather_batch(RetrievalBatch(queries[rows], passages[rows], teacher[rows] if rank == 0 else None))
        except ValueError as e:
            errors["teacher"] = str(e)
        results["errors"] = errors
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("objective", "paradigm", "scale"), CASES)
def test_gathered_loss_and_grads_match_single_process(
    rank_results: list[dict], objective: str, paradigm: str, scale: float
) -> None:
    queries, passages, teacher = _global_data()
    ref = _loss_and_grads(queries, passages, teacher, objective, paradigm, scale)  # not distributed here
    half = queries.shape[0] // WORLD
    for rank, results in enumerate(rank_results):
        got = results[f"{objective}/{paradigm}"]
        assert set(got) == set(ref)
        for name in ref:
            if name.endswith("_grad"):
                expected = ref[name][rank * half : (rank + 1) * half]
            else:
                expected = ref[name]
            torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-6, msg=f"rank {rank} {name}")
        # the gradient is not trivially zero: local reps really receive the global loss's gradient
        assert got["q_grad"].abs().sum() > 1e-3


@pytest.mark.timeout(60)
def test_gather_order_and_mismatch_errors(rank_results: list[dict]) -> None:
    expected = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    for results in rank_results:
        torch.testing.assert_close(results["gathered"], expected, rtol=0, atol=0)
        errors = results["errors"]
        assert "shapes differ across ranks (rank 0: (1, 3), rank 1: (2, 3))" in errors["uneven"]
        assert "teacher yes" in errors["teacher"] and "teacher no" in errors["teacher"]
        assert "teacher scores on all ranks or none" in errors["teacher"]
