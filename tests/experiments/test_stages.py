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


def test_wall_time_and_stage_sum_are_named_for_what_they_are() -> None:
    """Parallel stages overlap: a report names the invocation's wall time and the sum of the stage
    times separately; results written before the sum had its own key still read."""
    from monquant.experiments.stages import stage_seconds_sum, wall_time_line

    res = {"stage_seconds": {"a": 100.0, "b": 110.0}, "stage_seconds_sum": 210.0,
           "wall_seconds_this_invocation": 120.0, "resumed_stages": []}  # fmt: skip
    assert stage_seconds_sum(res) == 210.0
    line = wall_time_line(res)
    assert line.startswith("Wall time of this invocation: 2.0 min") and "add up to 3.5 min" in line
    assert "reused" in wall_time_line({**res, "resumed_stages": ["a"]})
    old = {"stage_seconds": {"a": 60.0}, "wall_seconds_all_stages": 60.0}
    assert stage_seconds_sum(old) == 60.0
    assert "not recorded" in wall_time_line(old)
    assert stage_seconds_sum({"stage_seconds": {"a": 1.0, "b": 2.0}}) == 3.0
