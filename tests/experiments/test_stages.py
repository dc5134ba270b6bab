"""Stages as executor tasks: finished ones are saved and skipped on resume; a failure is never
saved, and either stops the run (after the others are saved) or comes back in its place."""

from __future__ import annotations

import pytest

from monquant.errors import MonquantError
from monquant.executors import ExecutorSpec, Task, TaskFailure
from monquant.experiments.stages import StageRunner, run_task_stages


def _square(payload: int, x: int) -> int:
    if x < 0:
        raise ValueError("negative")
    return payload * x * x


def test_run_task_stages_saves_resumes_and_reports_failures(tmp_path) -> None:
    spec = ExecutorSpec("serial")
    tasks = [Task("a", _square, (2,)), Task("bad", _square, (-1,)), Task("b", _square, (3,))]
    with pytest.raises(MonquantError, match=r"bad: .*negative"):
        run_task_stages(StageRunner(tmp_path, False, None), spec, tasks, 10)
    assert sorted(p.stem for p in (tmp_path / "stages").glob("*.json")) == ["a", "b"]
    runner = StageRunner(tmp_path, True, None)
    kept = run_task_stages(runner, spec, tasks, 10, keep_failures=True)
    assert kept["a"] == 40 and kept["b"] == 90 and isinstance(kept["bad"], TaskFailure)
    assert sorted(runner.skipped) == ["a", "b"]  # resumed, not run again
    assert not (tmp_path / "stages" / "bad.json").exists()  # a failure is never saved
