"""Data-parallel training (monquant.training.distributed): two CPU processes with gloo follow the
single-process run with the same global batch, and ``torchrun -m monquant train`` writes its run
folder from rank 0 only and resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from monquant.model import MonDEQClassifier, MonDEQConfig
from monquant.training.loop import TrainConfig, train

CFG = TrainConfig(epochs=2, batch_size=32, lr=3e-3, decay_epoch=1)


def _data() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (200,), generator=g)
    x = torch.randn(4, 12, generator=g)[y] + 0.5 * torch.randn(200, 12, generator=g)
    return x[:160], y[:160], x[160:], y[160:]


def _model() -> MonDEQClassifier:
    torch.manual_seed(0)
    return MonDEQClassifier(MonDEQConfig(in_features=12, hidden=10, out_features=4, margin_init=0.5))


def _rank(rank: int, size: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        model = _model()
        hist = train(model, *_data(), CFG, progress=False)
        if rank == 0:
            torch.save({"state": model.state_dict(), "loss": [h["loss"] for h in hist],
                        "solves": [h["train_solves"] for h in hist]}, out)  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_follow_the_single_process_run(tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'init'}", str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        hist = train(model, *_data(), CFG, progress=False)
    finally:
        torch.set_num_threads(before)
    assert ddp["solves"] == [h["train_solves"] for h in hist] == [160, 160]  # both shards counted
    for a, b in zip(ddp["loss"], [h["loss"] for h in hist], strict=True):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b))
    for k, v in model.state_dict().items():
        assert torch.allclose(ddp["state"][k], v, rtol=1e-4, atol=1e-6), k
    assert not torch.equal(model.layer.A, _model().layer.A)  # it did train


def test_torchrun_writes_from_rank_zero_and_resumes(tmp_path: Path, tiny_mnist) -> None:
    data = tiny_mnist(tmp_path / "mnist", 256, 64)
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"

    def torchrun(*extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--standalone", "-m", "monquant", "train", "--out", str(run), "--hidden",
               "8", "--batch-size", "32", "--data-dir", str(data), "--no-download",
               "--no-progress", "--threads", "1", *extra]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)

    first = torchrun("--epochs", "1")
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("trained 1 epochs") == 1  # rank 0 reports, once
    log = json.loads((run / "log.json").read_text())
    assert log["settings"]["world_size"] == 2 and len(log["history"]) == 1
    assert not list(run.glob(".*.tmp")) and not (run / ".monquant.lock").exists()
    again = torchrun("--epochs", "2", "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    log = json.loads((run / "log.json").read_text())
    assert [h["epoch"] for h in log["history"]] == [1, 2]
    assert (run / "model.safetensors").exists()
