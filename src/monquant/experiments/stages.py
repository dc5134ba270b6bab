"""Named stages of a study: each saved to ``<out>/stages/<name>.json`` when it ends; a resumed
study skips the finished ones (``monquant reproduce``, ``lowbit``, ``robustness``, ``conv``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monquant.storage.jsonio import read_json, write_json

__all__ = ["StageRunner", "run_task_stages", "stage_seconds_sum", "wall_time_line"]


class StageRunner:
    """Runs named stages once: results are written as soon as a stage ends; resume skips them."""

    def __init__(self, out: Path, resume: bool, echo: Callable[[str], None] | None) -> None:
        self.dir = out / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.resume = resume
        self.echo = echo
        self.timings: dict[str, float] = {}
        self.skipped: list[str] = []

    def done(self, name: str) -> bool:
        """Whether ``name`` finished in an earlier run and ``resume`` skips it."""
        return self.resume and (self.dir / f"{name}.json").exists()

    def record(self, name: str, result: Any, seconds: float) -> Any:
        """Save a stage computed elsewhere (e.g. by a sweep's worker); returns it as read back."""
        path = self.dir / f"{name}.json"
        write_json(path, {"seconds": seconds, "result": result})
        self.timings[name] = seconds
        if self.echo:
            self.echo(f"[{name}] done in {seconds:.1f} s")
        return read_json(path)["result"]

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        path = self.dir / f"{name}.json"
        if self.resume and path.exists():
            saved = read_json(path)
            self.timings[name] = saved["seconds"]
            self.skipped.append(name)
            if self.echo:
                self.echo(f"[{name}] done in an earlier run ({saved['seconds']:.1f} s): skipped")
            return saved["result"]
        if self.echo:
            self.echo(f"[{name}] running ...")
        t0 = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t0
        write_json(path, {"seconds": dt, "result": result})
        self.timings[name] = dt
        if self.echo:
            self.echo(f"[{name}] done in {dt:.1f} s")
        return read_json(path)["result"]


def run_task_stages(
    runner: StageRunner, spec: Any, tasks: list[Any], payload: Any, *, keep_failures: bool = False
) -> dict[str, Any]:
    """Run independent stages as tasks on an executor (:mod:`monquant.executors`): each task is one
    stage named after it; finished ones are skipped on resume, each result is recorded by this
    process as it arrives. A failed task is not saved (``--resume`` retries it); when any failed,
    this raises after the others are saved, or with ``keep_failures`` returns its
    :class:`~monquant.executors.TaskFailure` in its place (for a caller that reports it as a row).
    Returns every stage's result by name."""
    from monquant.errors import MonquantError
    from monquant.executors import TaskFailure, run_tasks

    done = {t.name: runner.run(t.name, lambda: None) for t in tasks if runner.done(t.name)}
    failures = []
    for task, result, seconds in run_tasks(spec, [t for t in tasks if t.name not in done], payload):
        if not isinstance(result, TaskFailure):
            done[task.name] = runner.record(task.name, result, seconds)
        elif keep_failures:
            done[task.name] = result
        else:
            failures.append(f"{task.name}: {result.error}")
    if failures:
        raise MonquantError("stages failed (the others are saved; --resume retries): "
                            + "; ".join(failures))  # fmt: skip
    return done


def stage_seconds_sum(results: dict[str, Any]) -> float:
    """The stage times of a study's results added up (results written before this key existed
    stored the same sum as ``wall_seconds_all_stages``). Stages that ran in parallel on an
    executor overlap, so the sum exceeds the wall time."""
    if "stage_seconds_sum" in results:
        return float(results["stage_seconds_sum"])
    if "wall_seconds_all_stages" in results:
        return float(results["wall_seconds_all_stages"])
    return float(sum(results.get("stage_seconds", {}).values()))


def wall_time_line(results: dict[str, Any]) -> str:
    """One line for a report: the invocation's wall time (when recorded) and the sum of the stage
    times, each named for what it is."""
    total = stage_seconds_sum(results)
    wall = results.get("wall_seconds_this_invocation")
    if wall is None:
        return f"Stage times add up to {total / 60:.1f} min (the wall time was not recorded)"
    line = f"Wall time of this invocation: {wall / 60:.1f} min; stage times add up to {total / 60:.1f} min"
    if results.get("resumed_stages"):
        line += " (stages reused from an earlier invocation cost no wall time here)"
    return line
