"""``monquant reproduce``: every result of the source paper (Li, Leong, Chaffey 2026), stage by stage.

Stages (each saved to ``<out>/stages/<name>.json`` as soon as it finishes; ``resume=True`` skips
finished stages, and an interrupted training resumes from its per-epoch checkpoint):

1. ``float``: train the float model (paper setup) or load ``--model``; the trainings of stages 1,
   4 and 6 are independent of each other and run first, as tasks on the configured executor;
2. ``phase_transition``: Figure 1, PTQ of W at 3..32 bits;
3. ``displacement``: Figure 2, Theorem 3 on float64 equilibria;
4. ``qat_<b>`` and ``qat_vs_ptq``: Figure 3, STE QAT from scratch against PTQ;
5. ``iterate_quant``: Corollary 2;
6. ``seeds``: the float model trained again at ``extra_seeds`` and its PTQ certificates at 3..8
   bits under both step rules (no solves): does the phase transition hold across seeds?

The report (Markdown + JSON + PNG/PDF figures) is rendered by :mod:`monquant.experiments.paper.report`.
"""

from __future__ import annotations

import platform
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from monquant import __version__
from monquant.data import MNIST, random_subset, subset
from monquant.experiments.paper.displacement import run_displacement
from monquant.experiments.paper.iterate_quant import run_iterate_quantization
from monquant.experiments.paper.phase_transition import PAPER_BITS, run_phase_transition
from monquant.experiments.paper.qat_vs_ptq import compare_row
from monquant.experiments.paper.setup import SETUPS
from monquant.experiments.stages import StageRunner
from monquant.storage.checkpoints import load_model
from monquant.training.runs import TrainRequest, run_training

__all__ = ["ReproduceConfig", "StageRunner", "run_reproduce"]

@dataclass
class ReproduceConfig:
    """What to run. ``quick()`` gives the small CI-sized variant of the same pipeline."""

    out: Path = Path("results/paper")
    model: Path | None = None
    epochs: int = 15
    qat_epochs: int | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    ptq_bits: tuple[int, ...] = PAPER_BITS
    displacement_samples: int = 2560
    displacement_bits: tuple[int, ...] = (6, 8, 12, 16)
    qat_bits: tuple[int, ...] = (4, 6, 8)
    fb_samples: int = 1000
    paper_fb_samples: int = 64
    #: more training seeds for the across-seeds table (certificates only); quick mode: none
    extra_seeds: tuple[int, ...] = (43, 44)
    seed_bits: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
    #: ``paper`` (default): the paper's code wherever its text is silent; ``fast``: monquant's
    #: earlier defaults. ``None`` fields below are filled from :data:`SETUPS`.
    setup: str = "paper"
    margin_init: float | None = None
    margin_floor: float | None = None
    rank: int | None = None
    init: str | None = None
    iterate_samples: int = 64
    iterate_steps: int = 300
    seed: int | None = None
    qat_parts: tuple[str, ...] | None = None
    solver: str = "pr"
    tol: float | None = None
    max_iter: int | None = None
    resume: bool = False
    progress: bool = True
    quick: bool = False
    #: where the independent trainings (QAT stages, extra seeds) run (``monquant.executors``)
    executor: str = "serial"
    workers: int | None = None
    address: str | None = None
    worker_threads: int | None = None
    command: list[str] = field(default_factory=list)  # the command line, recorded in the report

    def __post_init__(self) -> None:
        from monquant.errors import ConfigError

        if self.setup not in SETUPS:
            raise ConfigError(f"unknown setup {self.setup!r}; choose one of {', '.join(SETUPS)}")
        preset = SETUPS[self.setup]
        for name in ("margin_init", "margin_floor", "init", "seed", "tol", "max_iter", "qat_parts"):
            if getattr(self, name) is None:
                setattr(self, name, preset[name])
        if self.rank is None and preset["rank"] == "n/4":
            self.rank = max(4, 100 // 4)

    @classmethod
    def quick_config(cls, **kw: Any) -> ReproduceConfig:
        base = dict(
            epochs=2,
            train_limit=20_000,
            test_limit=1000,
            displacement_samples=256,
            fb_samples=200,
            qat_bits=(4,),
            iterate_samples=16,
            iterate_steps=150,
            extra_seeds=(),
            quick=True,
        )
        base.update(kw)
        return cls(**base)


def _train_request(cfg: ReproduceConfig, out: Path, qat_bits: int | None) -> TrainRequest:
    """The paper's training setup; with ``resume`` an interrupted training continues."""
    epochs = cfg.epochs if qat_bits is None or cfg.qat_epochs is None else cfg.qat_epochs
    return TrainRequest.of(out,
        solver={"method": cfg.solver, "tol": cfg.tol, "max_iter": cfg.max_iter},
        margin_init=cfg.margin_init,
        margin_floor=cfg.margin_floor,
        rank=cfg.rank,
        init=cfg.init,
        epochs=epochs,
        decay_epoch=10 if epochs > 10 else max(1, epochs - 1),
        seed=cfg.seed,
        qat_bits=qat_bits,
        qat_parts=list(cfg.qat_parts or ("W",)) if qat_bits is not None else ["W"],
        resume=cfg.resume,
        progress=cfg.progress,
    )


def _train_stage(cfg: ReproduceConfig, data: MNIST, out: Path, qat_bits: int | None, echo):
    req = _train_request(cfg, out, qat_bits)
    res = run_training(req, data, echo=echo)
    return {"model": res["model"], "history": res["history"], "train_seconds": res["seconds"]}


def _seed_certificates(model: Any, seed: int, bits: tuple[int, ...], accuracy: float) -> dict:
    from monquant.certify import certify
    from monquant.verified import spectral_bounds

    W = model.layer.weight().detach()
    st = spectral_bounds(W)
    rows = {}
    for rule in ("paper", "narrow"):
        rows[rule] = [
            {"bits": c.bits, "dW_over_m": c.dW_over_m, "margin_quantized": c.margin_quantized,
             "verdict": c.verdict, "tier": c.tier}
            for c in (certify(W, b, step_rule=rule, float_bounds=st) for b in bits)
        ]  # fmt: skip
    return {"seed": seed, "accuracy": accuracy, "m": st.m, "L": st.L,
            "kappa": st.L / st.m if st.m > 0 else float("inf"),
            "w_max": float(W.abs().max()), "rows": rows}  # fmt: skip


def _seed_study(cfg: ReproduceConfig, model: Any, float_stage: dict,
                trained: dict[int, dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """The float model at ``cfg.seed`` and at every extra seed (``trained``: their training
    stages), with PTQ certificates."""
    hist = float_stage.get("history") or [{}]
    acc = hist[-1].get("test_accuracy", float("nan"))
    main_seed = _seed_certificates(model, int(cfg.seed or 0), cfg.seed_bits, acc)
    per_seed = [main_seed]
    for s, res in trained.items():
        m = load_model(res["model"]).model.eval()
        per_seed.append(_seed_certificates(m, s, cfg.seed_bits, res["history"][-1]["test_accuracy"]))
    return {"bits": list(cfg.seed_bits), "seeds": per_seed}


def _train_task(data: MNIST, cfg: ReproduceConfig, out: Path, qat_bits: int | None,
                echo: Callable[[str], None] | None) -> dict[str, Any]:  # fmt: skip
    return _train_stage(cfg, data, out, qat_bits, echo)


def _independent_trainings(cfg: ReproduceConfig, data: MNIST, out: Path, runner: StageRunner,
                           echo: Callable[[str], None] | None) -> dict[str, Any]:  # fmt: skip
    """Every training: the float model (unless a checkpoint is given), the QAT trainings and the
    extra seeds' float trainings. They are independent (QAT trains from scratch), so they run as
    tasks on the configured executor (stages ``float``, ``qat_<b>`` and ``float_seed_<s>``):
    serially the float model first, on a pool the QAT trainings first (the fewest bits first: they
    take longest). A failed one stops the reproduction with its error (the others are saved;
    ``--resume`` retries)."""
    from dataclasses import replace

    from monquant.executors import ExecutorSpec, Task
    from monquant.experiments.stages import run_task_stages

    serial = cfg.executor == "serial"
    tasks = [Task(f"qat_{b}", _train_task, (cfg, out / f"qat-{b}", b, echo if serial else None))
             for b in cfg.qat_bits]  # fmt: skip
    if cfg.model is None:  # a given checkpoint has no seed to vary
        tasks.insert(0, Task("float", _train_task, (cfg, out / "float", None, echo if serial else None)))
        tasks += [Task(f"float_seed_{s}", _train_task,
                       (replace(cfg, seed=s), out / f"float-seed{s}", None, echo if serial else None))
                  for s in cfg.extra_seeds]  # fmt: skip
    if not serial:  # on a pool the longest start first, so that the last to finish is a short one:
        # QAT (its quantized operators have the smaller margins; the fewest bits, the most iterations)
        qat = {f"qat_{b}": b for b in cfg.qat_bits}
        tasks.sort(key=lambda t: (t.name not in qat, qat.get(t.name, 0)))
    spec = ExecutorSpec(cfg.executor, cfg.workers, cfg.address, cfg.worker_threads)
    return run_task_stages(runner, spec, tasks, data)


def run_reproduce(
    cfg: ReproduceConfig, data: MNIST, echo: Callable[[str], None] | None = print
) -> dict[str, Any]:
    """Run every stage (skipping finished ones on resume) and render the report.

    After the trainings only the test set is kept (:meth:`MNIST.test_only`): a caller that keeps
    no reference to ``data`` (``monquant reproduce``) frees the training images for the rest."""
    from monquant.experiments.paper.report import render_report

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    runner = StageRunner(out, cfg.resume, echo)
    if cfg.train_limit is not None:
        data = MNIST(
            x_train=data.x_train[: cfg.train_limit],
            y_train=data.y_train[: cfg.train_limit],
            x_test=data.x_test,
            y_test=data.y_test,
            source=data.source,
            md5=data.md5,
        )
    x_test, y_test = subset(data.x_test, data.y_test, cfg.test_limit)

    trained = _independent_trainings(cfg, data, out, runner, echo)
    data = data.test_only()  # every later stage reads the test set only (the caller's copy aside)
    if cfg.model is not None:
        float_stage = runner.run(
            "float",
            lambda: {"model": str(cfg.model), "history": None, "train_seconds": 0.0},
        )
    else:
        float_stage = trained["float"]
    model = load_model(float_stage["model"]).model.eval()

    def ptq_progress(b: int, row: dict[str, Any]) -> None:
        if echo:
            echo(
                f"  {b:2d} bits: ||dW||/m {row['dW_over_m']:.3g}  margin(W~) "
                f"{row['margin_quantized']:.3g}  converged {row['converged_fraction']:.3f}  "
                f"acc {row['accuracy']:.4f}"
            )

    phase = runner.run(
        "phase_transition",
        lambda: run_phase_transition(
            model, x_test, y_test, cfg.ptq_bits, progress=ptq_progress, fb_samples=cfg.fb_samples,
            paper_fb_samples=cfg.paper_fb_samples,
        ),
    )
    xd, _ = random_subset(data.x_test, data.y_test, cfg.displacement_samples, cfg.seed)
    disp = runner.run("displacement", lambda: run_displacement(model, xd, cfg.displacement_bits))
    rows = []
    for b in cfg.qat_bits:
        qat = trained[f"qat_{b}"]
        qmodel = load_model(qat["model"]).model.eval()
        rows.append(
            compare_row(
                "QAT", qmodel, b, x_test, y_test, extra={"train_seconds": qat["train_seconds"]},
                parts=tuple(cfg.qat_parts or ("W",)),
            )
        )
        rows.append(compare_row("PTQ", model, b, x_test, y_test, parts=tuple(cfg.qat_parts or ("W",))))
    qvp = runner.run("qat_vs_ptq", lambda: {"rows": rows})
    xi, _ = random_subset(data.x_test, data.y_test, cfg.iterate_samples, cfg.seed + 1)
    itq = runner.run(
        "iterate_quant",
        lambda: run_iterate_quantization(model, xi, iters=cfg.iterate_steps, method=cfg.solver),
    )
    extra = {s: trained[f"float_seed_{s}"] for s in cfg.extra_seeds if f"float_seed_{s}" in trained}
    seeds = runner.run("seeds", lambda: _seed_study(cfg, model, float_stage, extra))
    total = time.perf_counter() - t_start
    results = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "command": " ".join(shlex.quote(a) for a in cfg.command),
        "versions": {
            "monquant": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "data": {"source": str(data.source), "md5": data.md5},
        "float": float_stage,
        "phase_transition": phase,
        "displacement": disp,
        "qat_vs_ptq": qvp,
        "iterate_quant": itq,
        "seeds": seeds,
        "stage_seconds": runner.timings,
        "resumed_stages": runner.skipped,
        "wall_seconds_this_invocation": total,
        # stages that ran in parallel overlap: their times add up to more than the wall time
        "stage_seconds_sum": sum(runner.timings.values()),
    }
    return render_report(results, out)
