"""Where a sweep's independent tasks run: in this process, in worker processes, or on Ray.

A study hands :func:`run_tasks` a list of :class:`Task` (a name, a picklable function and its
arguments) and one shared payload (e.g. the data set, sent to each worker once); every task's
function is called as ``fn(payload, *args)`` and returns plain data. The executor decides where:

- ``serial``: here, one after another (the default);
- ``process``: ``workers`` local processes (``concurrent.futures``, spawned), each with
  ``cores // workers`` intra-op threads (:func:`monquant.runtime.threads_per_worker`); torch's
  pickler moves the payload's tensors into shared memory, so the workers map one copy of them
  (which ``ps`` and ``/usr/bin/time`` count in each process's resident size: ``RssShmem`` in
  ``/proc/PID/status``);
- ``ray``: Ray tasks (``pip install monquant[ray]``) on the cluster at ``address``, or on a local
  Ray started for the run with ``workers`` CPUs when no address is given.

Whatever the executor, results come back to the calling process, which alone writes stage files,
so results, ``--resume`` and reports are identical; a task that raises is returned as a
:class:`TaskFailure` (reported, never dropped; not saved, so ``--resume`` retries it).
``should_start()`` is asked before each task is launched (a time budget stops launching).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from monquant.errors import ConfigError, MonquantError
from monquant.names import EXECUTORS

__all__ = ["EXECUTORS", "ExecutorSpec", "Task", "TaskFailure", "run_tasks"]


@dataclass(frozen=True)
class ExecutorSpec:
    """``kind`` (:data:`EXECUTORS`), ``workers`` (process/ray; default: the available cores),
    ``address`` (ray: an existing cluster; ``None`` starts a local one) and ``threads`` (each
    worker's intra-op threads; default the cores shared out, 1 on a cluster)."""

    kind: str = "serial"
    workers: int | None = None
    address: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise ConfigError(f"executor must be one of {EXECUTORS}, got {self.kind!r}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.address is not None and self.kind != "ray":
            raise ConfigError("--address is for --executor ray")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")

    def n_workers(self) -> int:
        from monquant.runtime import available_cores

        return 1 if self.kind == "serial" else (self.workers or available_cores())


@dataclass
class Task:
    """One independent unit of a sweep: ``fn(payload, *args)`` under ``name``."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


@dataclass
class TaskFailure:
    """A task that raised: its name, the error and the traceback's last lines."""

    name: str
    error: str
    traceback: str = field(default="", repr=False)


def _call(fn: Callable[..., Any], payload: Any, args: tuple[Any, ...],
          threads: int | None) -> tuple[Any, float]:  # fmt: skip
    """Run one task where it landed (with its thread count): ``(result, seconds)``; an exception
    becomes a :class:`TaskFailure`."""
    import time

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        out = fn(payload, *args)
    except Exception as exc:
        out = TaskFailure("", f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=4))
    return out, time.perf_counter() - t0


# The payload of a process worker, set once by the pool initializer.
_WORKER_PAYLOAD: Any = None


def _init_worker(payload: Any) -> None:
    global _WORKER_PAYLOAD
    _WORKER_PAYLOAD = payload


def _process_call(fn: Callable[..., Any], args: tuple[Any, ...], threads: int) -> tuple[Any, float]:
    return _call(fn, _WORKER_PAYLOAD, args, threads)


def _named(task: Task, done: tuple[Any, float]) -> tuple[Task, Any, float]:
    out, seconds = done
    if isinstance(out, TaskFailure):
        out.name = task.name
    return task, out, seconds


def _pump(tasks: Sequence[Task], workers: int, should_start: Callable[[], bool],
          submit: Callable[[Task], Any], wait_one: Callable[[list[Any]], list[Any]],
          result: Callable[[Any], tuple[Any, float]]) -> Iterator:  # fmt: skip
    """Keep up to ``workers`` tasks running (launching one only when ``should_start()``) and
    yield each as it finishes; a handle whose ``result`` raises (the worker died) is a failure."""
    queue, running = list(tasks), {}
    while queue or running:
        while queue and len(running) < workers and should_start():
            t = queue.pop(0)
            running[submit(t)] = t
        if not running:
            return
        for h in wait_one(list(running)):
            t = running.pop(h)
            try:
                done = result(h)
            except Exception as exc:  # the worker itself died
                done = (TaskFailure(t.name, f"{type(exc).__name__}: {exc}"), 0.0)
            yield _named(t, done)


def _serial(tasks: Sequence[Task], payload: Any, should_start: Callable[[], bool]) -> Iterator:
    for t in tasks:
        if not should_start():
            return
        yield _named(t, _call(t.fn, payload, t.args, None))


def _process(tasks: Sequence[Task], payload: Any, spec: ExecutorSpec,
             should_start: Callable[[], bool]) -> Iterator:  # fmt: skip
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from monquant.runtime import threads_per_worker

    workers = spec.n_workers()
    threads = spec.threads or threads_per_worker(workers)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(payload,)) as pool:  # fmt: skip
        yield from _pump(
            tasks, workers, should_start,
            submit=lambda t: pool.submit(_process_call, t.fn, t.args, threads),
            wait_one=lambda hs: list(wait(hs, return_when=FIRST_COMPLETED)[0]),
            result=lambda f: f.result(),
        )  # fmt: skip


def _ray(tasks: Sequence[Task], payload: Any, spec: ExecutorSpec,
         should_start: Callable[[], bool]) -> Iterator:  # fmt: skip
    try:
        import ray
    except ImportError:
        raise MonquantError("--executor ray needs Ray: pip install 'monquant[ray]'") from None
    from monquant.runtime import threads_per_worker

    started = False
    if not ray.is_initialized():
        if spec.address is not None:
            ray.init(address=spec.address, log_to_driver=False)
        else:
            ray.init(num_cpus=spec.n_workers(), include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})  # fmt: skip
        started = True
    try:
        workers = int(ray.cluster_resources().get("CPU", spec.n_workers()))
        threads = spec.threads or (1 if spec.address is not None else threads_per_worker(workers))
        remote = ray.remote(num_cpus=1, max_retries=0)(_call)
        ref = ray.put(payload)  # sent to the object store once, shared by every task
        yield from _pump(
            tasks, workers, should_start,
            submit=lambda t: remote.remote(t.fn, ref, t.args, threads),
            wait_one=lambda hs: ray.wait(hs, num_returns=1)[0],
            result=ray.get,
        )  # fmt: skip
    finally:
        if started:
            ray.shutdown()


def run_tasks(spec: ExecutorSpec, tasks: Sequence[Task], payload: Any = None,
              should_start: Callable[[], bool] = lambda: True,
              ) -> Iterator[tuple[Task, Any, float]]:  # fmt: skip
    """Yield ``(task, result or TaskFailure, seconds)`` as each task finishes (serial: in
    order); tasks never started (``should_start()`` said no) are not yielded."""
    if spec.kind == "serial":
        return _serial(tasks, payload, should_start)
    if spec.kind == "process":
        return _process(tasks, payload, spec, should_start)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    return _ray(tasks, payload, spec, should_start)
