"""Thread-count choice (monquant.runtime)."""

from __future__ import annotations

import pytest
import torch

from monquant.errors import ConfigError
from monquant.runtime import available_cores, choose_threads, set_threads, threads_per_worker


def test_auto_leaves_the_busy_cores_alone() -> None:
    assert choose_threads("auto", cores=2, busy=0) == 2
    assert choose_threads("auto", cores=2, busy=1) == 1
    assert choose_threads("auto", cores=2, busy=5) == 1  # never below one
    assert choose_threads("auto", cores=16, busy=3) == 13
    assert 1 <= choose_threads("auto") <= available_cores()


def test_explicit_counts_and_errors() -> None:
    assert choose_threads(3) == 3 and choose_threads("4") == 4
    for bad in (0, -1, "x", True):
        with pytest.raises(ConfigError, match="threads"):
            choose_threads(bad)


def test_set_threads_sets_torch_and_workers_share_the_cores() -> None:
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert threads_per_worker(2, cores=2) == 1
    assert threads_per_worker(3, cores=16) == 5
    assert threads_per_worker(8, cores=2) == 1


def test_cli_records_the_thread_count(tmp_path, tiny_mnist, capsys) -> None:
    import json

    from monquant.cli import main

    data = tiny_mnist(tmp_path / "mnist", 200, 50)
    before = torch.get_num_threads()
    try:
        rc = main(["train", "--out", str(tmp_path / "run"), "--hidden", "8", "--epochs", "1",
                   "--threads", "1", "--data-dir", str(data), "--no-download", "--no-progress"])  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert rc == 0
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["settings"]["threads"] == 1
