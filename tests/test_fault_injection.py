"""Fault injection: ``monquant train`` killed with SIGKILL at random moments, then resumed, again and
again, ends with exactly the model of an uninterrupted run (issue 14).

After every kill the run folder must be resumable: the checkpoint, when there is one, loads (it is
never half-written), and the next ``--resume`` takes over the dead process's lock and removes its
temporaries.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from monquant.storage.checkpoints import load_model
from monquant.storage.tensors import load_tensors

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


def _train(out: Path, data: Path, resume: bool) -> list[str]:
    argv = [sys.executable, "-m", "monquant", "train", "--out", str(out), "--hidden", "24",
            "--epochs", "8", "--batch-size", "32", "--seed", "3", "--data-dir", str(data),
            "--no-download", "--no-progress"]  # fmt: skip
    return argv + (["--resume"] if resume else [])


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_tensors(path)[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, tiny_mnist) -> Path:
    return tiny_mnist(tmp_path_factory.mktemp("mnist"), 1200, 200)


def test_kill_9_at_random_moments_then_resume_is_bit_exact(tmp_path: Path, data: Path) -> None:
    ref = tmp_path / "ref"
    subprocess.run(_train(ref, data, False), env=ENV, check=True, capture_output=True, timeout=300)

    run = tmp_path / "run"
    ckpt = run / "checkpoint.safetensors"
    rng = random.Random(14)
    kills = 0
    finished = False
    epochs_done: set[int] = set()
    for attempt in range(20):
        proc = subprocess.Popen(
            _train(run, data, resume=attempt > 0), env=ENV,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        # kill once this process has written 1 or 2 checkpoints, a random moment later (which
        # lands anywhere in the next epoch: in a batch, in the checkpoint write, after it)
        wanted, seen = rng.randint(1, 2), 0
        last = ckpt.stat().st_mtime_ns if ckpt.exists() else None
        while proc.poll() is None and seen < wanted:
            now = ckpt.stat().st_mtime_ns if ckpt.exists() else None
            if now != last:
                seen, last = seen + 1, now
            time.sleep(0.005)
        if proc.poll() is None:
            time.sleep(rng.uniform(0.0, 0.2))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        err = proc.stderr.read().decode() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        if proc.returncode == 0:
            finished = True
            break
        assert proc.returncode == -signal.SIGKILL, err
        # resumable after every kill: a checkpoint, if any, is whole and loads
        if ckpt.exists():
            state = load_model(ckpt).train_state
            assert state is not None
            epochs_done.add(int(state["epoch"]))
    if not finished:  # the kills came too fast to ever finish: finish without them
        subprocess.run(_train(run, data, True), env=ENV, check=True, capture_output=True)
    assert kills >= 3, f"only {kills} kills landed: the run is too short for this test"
    assert len(epochs_done) >= 2, epochs_done  # kills landed at different points of training

    a, b = _tensors(ref / "model.safetensors"), _tensors(run / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-exact, not approximately equal
    hist_a = json.loads((ref / "log.json").read_text())["history"]
    hist_b = json.loads((run / "log.json").read_text())["history"]
    strip = ("seconds", "time", "wall")
    assert [{k: v for k, v in e.items() if not k.endswith(strip)} for e in hist_a] == [
        {k: v for k, v in e.items() if not k.endswith(strip)} for e in hist_b
    ]
    assert not list(run.glob(".*.tmp"))  # no temporaries left behind
    assert not (run / ".monquant.lock").exists()


def test_sigint_stops_cleanly_with_status_130_and_the_run_resumes(tmp_path: Path, data: Path) -> None:
    run = tmp_path / "run"
    ckpt = run / "checkpoint.safetensors"
    proc = subprocess.Popen(_train(run, data, False), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while proc.poll() is None and not ckpt.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("training finished before the interrupt arrived")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted after" in err.splitlines()[-1]
    assert not (run / ".monquant.lock").exists() and not list(run.glob(".*.tmp"))
    done = subprocess.run(_train(run, data, True), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("resuming ")
