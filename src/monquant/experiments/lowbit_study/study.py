"""``monquant lowbit``: how low can a MonDEQ go while its convergence stays certified?

Compares, at 2, 3, 4, 6 and 8 bits and per-tensor / per-channel scaling, the methods of
:mod:`monquant.training.methods`: PTQ, STE QAT, margin-aware QAT, ProxQuant on ``W`` and ProxQuant on the
factors ``A``, ``B`` (plus mixed-precision rows where ``W`` and ``U`` get different bit-widths).
For each configuration and seed: test accuracy through the deployed ``W~``, ``margin(W~)``,
``||dW||/m``, the certificate tier, the fraction of converged solves, the weight storage and the
products per solver iteration.

The protocol (how the training budget is spent) is :data:`PROTOCOL`, quoted in every report.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monquant.data import MNIST, random_subset, subset
from monquant.errors import ConfigError, MonquantError
from monquant.executors import ExecutorSpec, Task, TaskFailure, run_tasks
from monquant.experiments.stages import StageRunner
from monquant.model import MonDEQClassifier
from monquant.storage.checkpoints import load_model
from monquant.storage.jsonio import read_json, write_json
from monquant.training.loop import evaluate
from monquant.training.methods import (
    KINDS,
    QuantMethod,
    deployed_weights,
    finetune_method,
    free_copy,
)
from monquant.training.runs import TrainRequest, run_training

__all__ = [
    "PROTOCOL",
    "LowbitConfig",
    "deploy_row",
    "run_lowbit",
    "solver_agreement",
    "stage_name",
]

BITS: tuple[int, ...] = (2, 3, 4, 6, 8)
PROTOCOL = """\
Full QAT from scratch for every configuration (4 trained methods x 5 bit-widths x 2 granularities
x 3 seeds = 120 runs of 15 epochs) does not fit a 2-core CPU. Instead, per seed:

1. one float model in the paper's setup (Adam 1e-3, 15 epochs, x0.1 at epoch 10, batch 128,
   learnable margin; or a given ``float_model`` for every seed);
2. PTQ of that model (no training);
3. every trained method *fine-tunes the same float model* for ``epochs`` epochs (default 3) on a
   random ``train_limit``-sample subset of the training set (drawn from the seed), Adam with the
   paper's batch size, lr ``1e-3`` decayed x0.1 for the last epoch. ProxQuant's ``lam_t`` grows
   linearly over the first ``epochs - 1`` epochs; the weights are frozen on their grid at the start
   of the last epoch, which then fine-tunes the float parts (``m``, ``U``, ``b``, head).

So all trained methods get the same data, steps and learning rates from the same starting point;
only the method differs (``QuantMethod.default``):

- STE QAT: the forward solve on ``Q_b(W)``, straight-through gradients; nothing else (the paper);
- margin-aware QAT: STE, plus ``m`` lifted before training just enough that
  ``margin(Q_b(W)) >= 0.1``, plus ``P_eig`` (``tau = 0.1``) and ``P_weyl``
  (``||sg(Q_b(W)) - W||_F / margin(W) <= 1``, weight 0.1) (see :mod:`monquant.training.methods`);
- ProxQuant: the W-shaped L1 prox toward the ``b``-bit uniform grid (scale per tensor or per row,
  calibrated at the start and then fixed), strength ``lr * lam_t``, ``lam_t`` linear from 0 to 5;
  on ``W`` (free parameterization) with the same lift and ``P_eig`` on ``nearest(W)`` as a guard;
  on the factors ``A``, ``B`` with ``m`` a float scalar;
- PTQ: ``Q_b`` of the float model.

Every deployed model is also evaluated with Douglas-Rachford on the first test images (a
certified ``W~`` has one equilibrium, so both solvers must agree).

Every stage is saved as soon as it finishes (:class:`StageRunner`) and ``resume`` skips
finished stages; ``budget_s`` stops launching new stages after that many seconds (the report
then says which stages are missing).
"""
MIXED: tuple[tuple[int, int], ...] = ((4, 8), (8, 4), (3, 8))
MIXED_KINDS: tuple[str, ...] = ("ptq", "margin", "proxquant-factors")
Echo = Callable[[str], None] | None


@dataclass
class LowbitConfig:
    """What ``monquant lowbit`` runs (see the module docstring for the protocol)."""

    out: Path = Path("results/lowbit")
    bits: tuple[int, ...] = BITS
    granularities: tuple[str, ...] = ("per-tensor", "per-channel")
    methods: tuple[str, ...] = KINDS
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 3
    lr: float = 1e-3
    train_limit: int | None = 20_000
    test_limit: int | None = None
    check_limit: int = 1000
    float_epochs: int = 15
    float_model: Path | None = None
    mixed: tuple[tuple[int, int], ...] = MIXED
    mixed_kinds: tuple[str, ...] = MIXED_KINDS
    mixed_granularity: str = "per-channel"
    hidden: int = 100
    solver: str = "pr"
    tol: float = 1e-4
    max_iter: int = 2000
    budget_s: float | None = None
    executor: str = "serial"
    workers: int | None = None
    address: str | None = None
    worker_threads: int | None = None
    quick: bool = False
    resume: bool = False
    progress: bool = True
    command: list[str] = field(default_factory=list)  # the command line, recorded in the report

    @classmethod
    def quick_config(cls, **kw: Any) -> LowbitConfig:
        """The CI-sized variant: 1 seed, 2 and 4 bits, per-tensor; a 2-epoch float model and
        1 fine-tuning epoch on 5,000 samples; 2,000 test images."""
        base: dict[str, Any] = dict(
            bits=(2, 4),
            granularities=("per-tensor",),
            seeds=(0,),
            epochs=1,
            train_limit=5000,
            test_limit=2000,
            check_limit=500,
            float_epochs=2,
            mixed=((4, 8),),
            mixed_kinds=("ptq",),
            mixed_granularity="per-tensor",
            quick=True,
        )
        base.update({k: v for k, v in kw.items() if v is not None})
        return cls(**base)

    def __post_init__(self) -> None:
        bad = set(self.methods) - set(KINDS)
        if bad:
            raise ConfigError(f"unknown methods {sorted(bad)}; choose from {KINDS}")
        if self.epochs < 1 or self.float_epochs < 1:
            raise ConfigError("epochs and float_epochs must be >= 1")

    def method_specs(self) -> list[QuantMethod]:
        """Every configuration: methods x granularities x bits, then the mixed-precision rows."""
        freeze = max(self.epochs - 1, 0) if self.epochs > 1 else None
        specs = [
            _with_freeze(QuantMethod.default(k, b, g), freeze)
            for b in self.bits
            for g in self.granularities
            for k in self.methods
        ]
        specs += [
            _with_freeze(QuantMethod.default(k, wb, self.mixed_granularity, ub), freeze)
            for wb, ub in self.mixed
            for k in self.mixed_kinds
            if k in self.methods
        ]
        return specs

    def as_dict(self) -> dict[str, Any]:
        return {
            k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()
        }


def _with_freeze(method: QuantMethod, freeze: int | None) -> QuantMethod:
    return (
        dataclasses.replace(method, freeze_epoch=freeze)
        if method.kind.startswith("prox")
        else method
    )


def stage_name(method: QuantMethod, seed: int) -> str:
    """File-safe stage name, e.g. ``margin-per-channel-w3-s0`` or ``ptq-per-tensor-w4-u8-s1``."""
    u = f"-u{method.u_bits}" if method.u_bits is not None else ""
    lm = f"-lm{method.robust_eps:g}" if method.robust_eps is not None else ""
    return f"{method.kind}{lm}-{method.granularity}-w{method.bits}{u}-s{seed}"


# ------------------------------------------------------------------------------------ one row


@torch.no_grad()
def solver_agreement(
    model: MonDEQClassifier, overrides: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> dict[str, float]:
    """Predictions of the configured solver against Douglas-Rachford on the same inputs.

    A certified ``W~`` has one equilibrium, so any convergent solver must give the same
    predictions; disagreement exposes a model that only "works" with one solver's iterates.
    """
    cfg = model.solver.forward_config
    preds, conv = {}, {}
    for method in (cfg.method, "dr"):
        with model.solver.configured(dataclasses.replace(cfg, method=method)):
            preds[method] = model(x, **overrides).argmax(dim=1)
            conv[method] = float(model.solver.last_forward.converged.double().mean())
    main, dr = preds[cfg.method], preds["dr"]
    return {
        "check_samples": int(x.shape[0]),
        "solver_agreement": float((main == dr).double().mean()),
        "dr_accuracy": float((dr == y).double().mean()),
        "check_accuracy": float((main == y).double().mean()),
        "dr_converged_fraction": conv["dr"],
    }


def deploy_row(
    model: MonDEQClassifier,
    method: QuantMethod,
    prepared: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    check: int,
) -> dict[str, Any]:
    """Deploy, certify and evaluate one configuration; plain numbers for the report."""
    model.eval()
    dep = deployed_weights(model, method, prepared)
    ov = dep.overrides()
    ev = evaluate(model, x, y, **ov)
    row = {
        "label": method.label,
        "kind": method.kind,
        "granularity": method.granularity,
        "bits": method.bits,
        "u_bits": method.u_bits,
        "status": "ok",
        "accuracy": ev.accuracy,
        "converged_fraction": ev.converged_fraction,
        "unconverged": ev.unconverged,
        "mean_iterations": ev.mean_iterations,
        "max_iterations": ev.max_iterations,
        **solver_agreement(model, ov, x[:check], y[:check]),
        "method": method.as_dict(),
        **dep.summary(),
    }
    return row


def _failed_row(method: QuantMethod, error: str) -> dict[str, Any]:
    return {
        "label": method.label,
        "kind": method.kind,
        "granularity": method.granularity,
        "bits": method.bits,
        "u_bits": method.u_bits,
        "status": "failed",
        "error": error,
        "accuracy": math.nan,
        "certified": False,
        "certified_weyl": False,
        "tier": "none",
        "converged_fraction": math.nan,
        "method": method.as_dict(),
    }


# ---------------------------------------------------------------------------------- the stages


def _float_stage(cfg: LowbitConfig, data: MNIST, seed: int, echo: Echo) -> dict[str, Any]:
    if cfg.float_model is not None:
        return {"model": str(cfg.float_model), "history": None, "train_seconds": 0.0}
    e = cfg.float_epochs
    req = TrainRequest.of(Path(cfg.out) / f"float-s{seed}",
        hidden=cfg.hidden,
        solver={"method": cfg.solver, "tol": cfg.tol, "max_iter": cfg.max_iter},
        epochs=e,
        decay_epoch=10 if e > 10 else max(1, e - 1),
        seed=seed,
        resume=cfg.resume,
        progress=cfg.progress,
    )
    res = run_training(req, data, echo=echo)
    return {"model": res["model"], "history": res["history"], "train_seconds": res["seconds"]}


def _fresh_model(path: str, method: QuantMethod) -> MonDEQClassifier:
    model = load_model(path).model
    return free_copy(model) if method.kind == "proxquant-w" else model


def _finetune(
    cfg: LowbitConfig,
    method: QuantMethod,
    float_path: str,
    train_xy: tuple[torch.Tensor, torch.Tensor],
    seed: int,
) -> tuple[MonDEQClassifier, Any, list[dict[str, Any]]]:
    """Fine-tune the float model with ``method`` (nothing for PTQ); return model, prep, history."""
    torch.manual_seed(seed)
    model = _fresh_model(float_path, method)
    prep, hist = finetune_method(
        model, method, *train_xy, cfg.epochs, cfg.lr, seed, eval_limit=cfg.check_limit
    )
    return model, prep, hist


def _config_stage(
    cfg: LowbitConfig,
    method: QuantMethod,
    float_path: str,
    train_xy: tuple[torch.Tensor, torch.Tensor],
    test_xy: tuple[torch.Tensor, torch.Tensor],
    seed: int,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        model, prep, hist = _finetune(cfg, method, float_path, train_xy, seed)
        row = deploy_row(model, method, prep, *test_xy, cfg.check_limit)
    except (MonquantError, torch.linalg.LinAlgError) as exc:  # a diverged run is a result
        row = _failed_row(method, f"{type(exc).__name__}: {exc}")
        row["traceback"] = traceback.format_exc(limit=3)
        hist, prep = [], None
    row["seed"] = seed
    row["train_seconds"] = time.perf_counter() - t0
    row["history"] = [_short_history(h) for h in hist]
    row["events"] = list(prep.events) if prep is not None else []
    return row


def _short_history(h: dict[str, Any]) -> dict[str, Any]:
    keys = ("epoch", "loss", "train_accuracy", "m", "margin_quantized", "train_unconverged")
    return {k: h[k] for k in keys if k in h}


def _ptq_stage(
    cfg: LowbitConfig,
    specs: Sequence[QuantMethod],
    float_path: str,
    test_xy: tuple[torch.Tensor, torch.Tensor],
    seed: int,
) -> dict[str, Any]:
    model = load_model(float_path).model.eval()
    fl = evaluate(model, *test_xy)
    rows = []
    for method in specs:
        row = deploy_row(model, method, None, *test_xy, cfg.check_limit)
        row["seed"] = seed
        rows.append(row)
    return {
        "float": {
            "accuracy": fl.accuracy,
            "converged_fraction": fl.converged_fraction,
            "m": float(model.layer.margin().detach()),
        },
        "rows": rows,
    }


class _Budget:
    """Stops launching stages after ``budget_s`` seconds (``None``: no limit)."""

    def __init__(self, budget_s: float | None) -> None:
        self.budget_s = budget_s
        self.t0 = time.perf_counter()
        self.skipped: list[str] = []

    def allows(self) -> bool:
        return self.budget_s is None or time.perf_counter() - self.t0 <= self.budget_s


# ------------------------------------------------------------------ tasks (any executor)


def _float_task(data: MNIST, cfg: LowbitConfig, seed: int, echo: Echo) -> dict[str, Any]:
    return _float_stage(cfg, data, seed, echo)


def _config_task(data: MNIST, cfg: LowbitConfig, method: QuantMethod, float_path: str,
                 seed: int) -> dict[str, Any]:  # fmt: skip
    test_xy = subset(data.x_test, data.y_test, cfg.test_limit)
    n_train = cfg.train_limit or data.x_train.shape[0]
    train_xy = random_subset(data.x_train, data.y_train, min(n_train, len(data.y_train)), seed,
                             keep_codes=True)  # fmt: skip
    return _config_stage(cfg, method, float_path, train_xy, test_xy, seed)


def _run_stages(
    cfg: LowbitConfig, tasks: list[Task], data: MNIST, runner: StageRunner, budget: _Budget
) -> dict[str, Any]:
    """Every task's result by name: read back when finished earlier (``resume``), else run on
    the configured executor and saved as it finishes; a failure is a :class:`TaskFailure`; a
    task the time budget kept from starting is absent (and listed in ``budget.skipped``)."""
    out: dict[str, Any] = {}
    pending = []
    for t in tasks:
        if runner.done(t.name):
            out[t.name] = runner.run(t.name, lambda: None)  # read back, counted as resumed
        else:
            pending.append(t)
    spec = ExecutorSpec(cfg.executor, cfg.workers, cfg.address, cfg.worker_threads)
    for task, result, seconds in run_tasks(spec, pending, data, budget.allows):
        out[task.name] = result if isinstance(result, TaskFailure) else (
            runner.record(task.name, result, seconds))  # fmt: skip
    budget.skipped += [t.name for t in pending if t.name not in out]
    return out


def _seed_float(results: dict[str, Any], seed: int) -> dict[str, Any] | None:
    r = results.get(f"float-s{seed}")
    return r if isinstance(r, dict) else None


def _row_line(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"  {row['label']} seed {row['seed']}: FAILED ({row.get('error', '')[:80]})"
    return (
        f"  {row['label']} seed {row['seed']}: acc {row['accuracy']:.4f}  "
        f"margin(W~) {row['margin_quantized']:.4g}  ||dW||/m {row['dW_over_m']:.3g}  "
        f"tier {row['tier']}  converged {row['converged_fraction']:.3f}"
    )


def run_lowbit(
    out: str | Path,
    data: MNIST,
    bits: Sequence[int] | None = None,
    granularities: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    epochs: int | None = None,
    float_model: str | Path | None = None,
    quick: bool = False,
    resume: bool = False,
    progress: bool = True,
    echo: Echo = print,
    **options: Any,
) -> dict[str, Any]:
    """Run (or resume) the low-bit comparison in ``out`` and write its report; return the results.

    ``None`` arguments take the full defaults (:class:`LowbitConfig`) or, with ``quick``, the
    quick ones. ``options`` sets any other :class:`LowbitConfig` field (``train_limit``,
    ``test_limit``, ``float_epochs``, ``hidden``, ``mixed``, ``budget_s``, ...).
    """
    kw: dict[str, Any] = dict(
        out=Path(out),
        bits=tuple(bits) if bits is not None else None,
        granularities=tuple(granularities) if granularities is not None else None,
        methods=tuple(methods) if methods is not None else None,
        seeds=tuple(seeds) if seeds is not None else None,
        epochs=epochs,
        float_model=Path(float_model) if float_model is not None else None,
        resume=resume,
        progress=progress,
        **options,
    )
    if quick:
        cfg = LowbitConfig.quick_config(**kw)
    else:
        cfg = LowbitConfig(**{k: v for k, v in kw.items() if v is not None})
    return _run(cfg, data, echo)


#: Settings that change what a finished stage holds: a resume must not mix them.
STAGE_SETTINGS: tuple[str, ...] = (
    "epochs",
    "lr",
    "train_limit",
    "test_limit",
    "check_limit",
    "float_epochs",
    "float_model",
    "hidden",
    "solver",
    "tol",
    "max_iter",
)


def _check_settings(cfg: LowbitConfig, out: Path) -> None:
    """Refuse to resume stages computed with other settings; record the settings otherwise."""
    path = out / "stage-settings.json"
    now = {k: v for k, v in cfg.as_dict().items() if k in STAGE_SETTINGS}
    if cfg.resume and path.exists():
        before = read_json(path)
        diff = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v}
        if diff:
            raise ConfigError(
                f"--resume: {out} holds stages computed with other settings {diff} "
                "(stored, requested); use a new --out"
            )
    write_json(path, now)


def _run(cfg: LowbitConfig, data: MNIST, echo: Echo) -> dict[str, Any]:
    from monquant.experiments.lowbit_study.report import render_lowbit

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(cfg, out)
    t_start = time.perf_counter()
    runner = StageRunner(out, cfg.resume, echo)
    budget = _Budget(cfg.budget_s)
    serial = cfg.executor == "serial"
    specs = cfg.method_specs()
    fl_tasks = [Task(f"float-s{seed}", _float_task, (cfg, seed, echo if serial else None))
                for seed in cfg.seeds]  # fmt: skip
    fl_results = _run_stages(cfg, fl_tasks, data, runner, budget)
    floats, ptqs, rows = {}, {}, []
    test_xy = subset(data.x_test, data.y_test, cfg.test_limit)
    ptq_specs = [m for m in specs if m.kind == "ptq"]
    trained: list[Task] = []
    for seed in cfg.seeds:
        fl = _seed_float(fl_results, seed)
        failure = fl_results.get(f"float-s{seed}")
        if fl is None:  # not run (budget) or failed: its configurations cannot run
            names = [stage_name(m, seed) for m in specs if m.kind != "ptq"]
            if isinstance(failure, TaskFailure):
                rows += [dict(_failed_row(m, f"float model failed: {failure.error}"), seed=seed)
                         for m in specs if m.kind != "ptq"]  # fmt: skip
            else:
                budget.skipped += names
            continue
        floats[str(seed)] = fl
        if (ptq_specs and budget.allows()) or runner.done(f"ptq-s{seed}"):
            ptq = runner.run(f"ptq-s{seed}",
                             lambda fl=fl, seed=seed: _ptq_stage(cfg, ptq_specs, fl["model"],
                                                                 test_xy, seed))  # fmt: skip
            ptqs[str(seed)] = ptq["float"]
            rows += ptq["rows"]
        elif ptq_specs:
            budget.skipped.append(f"ptq-s{seed}")
        trained += [Task(stage_name(m, seed), _config_task, (cfg, m, fl["model"], seed))
                    for m in specs if m.kind != "ptq"]  # fmt: skip
    results_by_name = _run_stages(cfg, trained, data, runner, budget)
    for task in trained:  # in the configurations' order, whatever order they finished in
        r = results_by_name.get(task.name)
        if r is None:
            continue
        if isinstance(r, TaskFailure):
            method, seed = task.args[1], task.args[3]
            r = dict(_failed_row(method, r.error), seed=seed, traceback=r.traceback)
        rows.append(r)
        if echo:
            echo(_row_line(r))
    results = {
        "config": cfg.as_dict(),
        "command": " ".join(shlex.quote(a) for a in cfg.command),
        "protocol": PROTOCOL.strip(),
        "float_models": floats,
        "float_eval": ptqs,
        "rows": rows,
        "stage_seconds": runner.timings,
        "resumed_stages": runner.skipped,
        "not_run": budget.skipped,
        # stages that ran in parallel overlap: their times add up to more than the wall time
        "stage_seconds_sum": sum(runner.timings.values()),
        "wall_seconds_this_invocation": time.perf_counter() - t_start,
    }
    return render_lowbit(results, out)
