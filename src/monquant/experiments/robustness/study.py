"""``monquant robustness``: certified behaviour of quantized MonDEQs, per configuration (issue 15).

For a float checkpoint and a list of configurations (the float model itself, PTQ at each
bit-width and granularity, and optionally models fine-tuned from the checkpoint by each training
method, with and without the Lipschitz-margin loss), one row each of:

- the **certified agreement rate**: the share of test inputs on which the quantized model provably
  predicts the float model's class (:func:`monquant.behaviour.agreement`: Theorem 3 swapped, and
  the quantized model's own proved solve), beside the **measured agreement rate** and the gap;
- **certified accuracy** at each L2 radius ``eps`` (proved: a lower bound on robust accuracy) and
  **PGD accuracy** through the implicit layer on the first ``pgd_samples`` inputs (measured: an
  upper bound), with the certified accuracy on those same inputs;
- the contradiction counters ``certified_but_disagreeing`` and ``certified_but_broken@eps``, which
  must be 0 (a certificate is a proof; :func:`check_rows` raises otherwise).

The fine-tuning protocol is :func:`monquant.training.methods.finetune_method`, the one of
``monquant lowbit`` (every trained configuration starts from the same float model and gets the
same data, steps and learning rates). Every configuration is one stage, saved as soon as it ends,
so ``resume`` skips finished ones. Rendering is :mod:`.report`.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monquant.errors import ConfigError
from monquant.names import GRANULARITIES, QUANT_METHODS

__all__ = [
    "PROTOCOL",
    "RobustnessConfig",
    "behaviour_row",
    "check_rows",
    "config_specs",
    "run_robustness",
]

Echo = Callable[[str], None] | None
TRAINED = tuple(k for k in QUANT_METHODS if k != "ptq")

PROTOCOL = """\
Every quantized configuration is compared with the same float model (the checkpoint): its
predictions are the reference of the agreement rates, and its proved equilibria (float64 PR,
tol 1e-10, a-posteriori errors from proved constants) feed Theorem 3. PTQ rows quantize the
checkpoint. Trained rows fine-tune it with the method for `epochs` epochs on a random
`train_limit`-sample subset of the training set (Adam, batch 128, lr x0.1 for the last epoch;
the protocol of `monquant lowbit`); `+lm` rows add the Lipschitz-margin loss at `robust_eps`
to margin-aware QAT. The quantized side of every certificate uses the deployed W~, U~ and head of
the configuration; radii are L2 in the model's input space (normalised pixels for MNIST)."""


@dataclass
class RobustnessConfig:
    """What ``monquant robustness`` runs (see the module docstring)."""

    checkpoint: Path
    out: Path | None = None
    bits: tuple[int, ...] = (4, 8)
    granularities: tuple[str, ...] = ("per-tensor",)
    quantize: tuple[str, ...] = ("W",)
    step_rule: str = "paper"
    methods: tuple[str, ...] = ("ptq",)
    train_bits: tuple[int, ...] = (4,)
    robust_eps: float | None = None
    eps: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    test_limit: int | None = 1000
    pgd_samples: int = 100
    pgd_steps: int = 20
    pgd_restarts: int = 2
    epochs: int = 3
    lr: float = 1e-3
    train_limit: int | None = 20_000
    seed: int = 0
    quick: bool = False
    resume: bool = False
    progress: bool = True
    command: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        bad = set(self.methods) - set(QUANT_METHODS)
        if bad:
            raise ConfigError(f"unknown methods {sorted(bad)}; choose from {QUANT_METHODS}")
        if set(self.granularities) - set(GRANULARITIES):
            raise ConfigError(f"granularities must be among {GRANULARITIES}")
        if self.robust_eps is not None and not self.robust_eps > 0:
            raise ConfigError(f"robust_eps must be > 0, got {self.robust_eps}")
        if self.epochs < 1 or self.pgd_samples < 1:
            raise ConfigError("epochs and pgd_samples must be >= 1")

    @classmethod
    def quick_config(cls, checkpoint: Path, **kw: Any) -> RobustnessConfig:
        """CI-sized: 200 test inputs, PGD on 20 (5 steps, 1 restart), one fine-tuning epoch on
        2,000 samples."""
        base: dict[str, Any] = dict(
            test_limit=200, pgd_samples=20, pgd_steps=5, pgd_restarts=1, epochs=1,
            train_limit=2000, quick=True,
        )  # fmt: skip
        base.update({k: v for k, v in kw.items() if v is not None})
        return cls(checkpoint=checkpoint, **base)

    @property
    def trains(self) -> bool:
        """Whether any configuration fine-tunes (then MNIST's training split is needed)."""
        return bool(set(self.methods) & set(TRAINED)) or self.robust_eps is not None

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def config_specs(cfg: RobustnessConfig) -> list[dict[str, Any]]:
    """Every configuration: ``{"name", "kind", "bits", "granularity", "robust_eps"}``; the float
    model first, then PTQ, then the trained methods, then the Lipschitz-margin rows."""
    specs: list[dict[str, Any]] = [
        {"name": "float", "kind": "float", "bits": None, "granularity": None, "robust_eps": None}
    ]

    def add(kind: str, bits: int, gran: str, lm: float | None = None) -> None:
        tag = f"+lm{lm:g}" if lm is not None else ""
        specs.append({"name": f"{kind}{tag}/{gran}/W{bits}", "kind": kind, "bits": bits,
                      "granularity": gran, "robust_eps": lm})  # fmt: skip

    if "ptq" in cfg.methods:
        for b in cfg.bits:
            for g in cfg.granularities:
                add("ptq", b, g)
    for kind in (k for k in TRAINED if k in cfg.methods):
        for b in cfg.train_bits:
            for g in cfg.granularities:
                add(kind, b, g)
    if cfg.robust_eps is not None:
        for b in cfg.train_bits:
            for g in cfg.granularities:
                add("margin", b, g, cfg.robust_eps)
    return specs


def _stage_name(spec: dict[str, Any]) -> str:
    return spec["name"].replace("/", "-").replace("+", "-").lower()


# ----------------------------------------------------------------------------- one configuration


def behaviour_row(
    model: torch.nn.Module,
    overrides: dict[str, torch.Tensor],
    ref: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: Sequence[float],
    pgd_samples: int,
    pgd_steps: int,
    pgd_restarts: int,
    quantized: bool,
) -> dict[str, Any]:
    """Certified and measured behaviour of ``model`` run with ``overrides`` (``W``, ``U``, ``b``;
    empty for the float model) against the float reference ``ref`` (a
    :class:`~monquant.behaviour.FloatReference` solved for ``x``)."""
    from monquant.attacks import pgd_l2
    from monquant.behaviour import ModelWeights, agreement

    rep = agreement(ref, ModelWeights.of(model, **overrides))
    with torch.no_grad():
        pred = model(x, **overrides).argmax(dim=1)
        last = model.solver.last_forward  # type: ignore[attr-defined]
    s = rep.summary(y, tuple(eps))
    kind = "quantized" if quantized else "float"
    s["certified_accuracy"] = {f"{e:g}": s.pop(f"certified_accuracy_{kind}@{e:g}") for e in eps}
    for e in eps:
        s.pop(f"certified_accuracy_{'float' if quantized else 'quantized'}@{e:g}", None)
    s["measured_agreement_rate"] = float((pred == rep.float_prediction).double().mean())
    s["agreement_gap"] = s["measured_agreement_rate"] - s["certified_agreement_rate"]
    s["measured_solves_unconverged"] = last.n_unconverged if last is not None else 0
    s["clean_accuracy"] = float((pred == y).double().mean())
    s["certified_but_disagreeing"] = int((rep.certified_agreement & (pred != rep.float_prediction)).sum())
    k = min(pgd_samples, x.shape[0])
    xp, yp = x[:k], y[:k]
    radius, ok = ((rep.radius_quantized, rep.certified_agreement) if quantized
                  else (rep.radius_float, rep.float_certified))  # fmt: skip
    correct = rep.float_prediction[:k] == yp
    s["pgd"] = {"samples": k, "steps": pgd_steps, "restarts": pgd_restarts,
                "clean_accuracy": float((pred[:k] == yp).double().mean()),
                "accuracy": {}, "certified_accuracy": {}, "certified_but_broken": {}}  # fmt: skip
    for e in eps:
        robust = pgd_l2(model, xp, yp, e, steps=pgd_steps, restarts=pgd_restarts, **overrides)
        cert = correct & ok[:k] & (radius[:k] > e)
        s["pgd"]["accuracy"][f"{e:g}"] = float(robust.double().mean())
        s["pgd"]["certified_accuracy"][f"{e:g}"] = float(cert.double().mean())
        s["pgd"]["certified_but_broken"][f"{e:g}"] = int((cert & ~robust).sum())  # must be 0
    s["radius_median"] = float((radius * ok).median())
    return s


def check_rows(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every contradiction of a certificate by a measurement (must be empty)."""
    bad = []
    for r in rows:
        if r.get("status") != "ok":
            continue
        if r["certified_but_disagreeing"]:
            bad.append(f"{r['name']}: {r['certified_but_disagreeing']} certified inputs disagree")
        for e, v in r["pgd"]["certified_but_broken"].items():
            if v:
                bad.append(f"{r['name']}: {v} inputs certified at eps {e} broken by PGD")
    return bad


def _deploy(
    spec: dict[str, Any], cfg: RobustnessConfig, model: torch.nn.Module, train_xy: Any, ref: Any
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, Any], list[dict[str, Any]]]:
    """``(model, overrides, certificate summary, fine-tuning log)`` of one configuration; ``ref``
    (the :class:`~monquant.behaviour.FloatReference`) holds the float operator's proved bounds."""
    from monquant.certify import certify
    from monquant.storage.checkpoints import load_model, quantize_model
    from monquant.training.methods import (
        QuantMethod,
        deployed_weights,
        finetune_method,
        free_copy,
    )

    if spec["kind"] == "float":
        return model, {}, {}, []
    if spec["kind"] == "ptq":
        qw = quantize_model(model, spec["bits"], spec["granularity"], cfg.quantize, cfg.step_rule)
        over = {k: v for k, v in qw.overrides().items() if v is not None}
        W = model.layer.weight().detach()  # type: ignore[attr-defined, operator]
        cert = certify(W, W_tilde=over.get("W", W), float_bounds=ref.bounds)  # float side once
        return model, over, {"verdict": cert.verdict, "tier": cert.tier,
                             "dW_over_m": cert.dW_over_m}, []  # fmt: skip
    method = dataclasses.replace(
        QuantMethod.default(spec["kind"], spec["bits"], spec["granularity"]),
        robust_eps=spec["robust_eps"],
    )
    torch.manual_seed(cfg.seed)
    tuned = load_model(cfg.checkpoint).model
    if method.kind == "proxquant-w":
        tuned = free_copy(tuned)
    prep, hist = finetune_method(tuned, method, *train_xy, cfg.epochs, cfg.lr, cfg.seed)
    tuned.eval()
    dep = deployed_weights(tuned, method, prep)
    keys = ("epoch", "loss", "train_accuracy", "m", "margin_quantized")
    log = [{k: h[k] for k in keys if k in h} for h in hist]
    summ = dep.summary()
    info = {"verdict": summ["verdict"], "tier": summ["tier"], "dW_over_m": summ["dW_over_m"],
            "deployment": summ, "events": prep.events}  # fmt: skip
    return tuned, dep.overrides(), info, log


def _config_stage(
    spec: dict[str, Any],
    cfg: RobustnessConfig,
    model: torch.nn.Module,
    ref: Any,
    test_xy: tuple[torch.Tensor, torch.Tensor],
    train_xy: Any,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    used, over, info, log = _deploy(spec, cfg, model, train_xy, ref)
    row = {**spec, "status": "ok", **info, "history": log,
           "train_seconds": time.perf_counter() - t0}  # fmt: skip
    row.update(behaviour_row(used, over, ref, *test_xy, cfg.eps, cfg.pgd_samples, cfg.pgd_steps,
                             cfg.pgd_restarts, quantized=spec["kind"] != "float"))  # fmt: skip
    # the proved margin of the deployed operator: the agreement certificate has just proved it
    row["margin_lower"] = row["margin_quantized_lower"]
    row["seconds"] = time.perf_counter() - t0
    return row


# ------------------------------------------------------------------------------------ the study


def run_robustness(cfg: RobustnessConfig, data: Any, echo: Echo = print) -> dict[str, Any]:
    """Run every configuration of ``cfg`` (stages in ``cfg.out`` when given, resumable) and, with
    ``cfg.out``, write the report. Returns the results (``rows``: one dict per configuration)."""
    from monquant.behaviour import FloatReference, ModelWeights
    from monquant.data import random_subset, subset
    from monquant.experiments.stages import StageRunner
    from monquant.progress import progress_bar
    from monquant.storage.checkpoints import load_model

    model = load_model(cfg.checkpoint).model.eval()
    test_xy = subset(data.x_test, data.y_test, cfg.test_limit)
    train_xy = None
    if cfg.trains:
        n = min(cfg.train_limit or data.x_train.shape[0], data.x_train.shape[0])
        train_xy = random_subset(data.x_train, data.y_train, n, cfg.seed, keep_codes=True)
    ref = FloatReference.solve(ModelWeights.of(model), test_xy[0])  # one float solve for all
    specs = config_specs(cfg)
    runner = StageRunner(Path(cfg.out), cfg.resume, None) if cfg.out is not None else None
    bar = progress_bar(desc="robustness", enabled=cfg.progress, total=len(specs), unit="config")
    rows = []
    for spec in specs:
        bar.set_postfix(config=spec["name"])

        def stage(spec: dict[str, Any] = spec) -> dict[str, Any]:
            return _config_stage(spec, cfg, model, ref, test_xy, train_xy)

        rows.append(runner.run(_stage_name(spec), stage) if runner is not None else stage())
        bar.update(1)
    bar.close()
    results = {
        "config": cfg.as_dict(),
        "command": " ".join(shlex.quote(a) for a in cfg.command),
        "protocol": PROTOCOL,
        "samples": int(test_xy[0].shape[0]),
        "rows": rows,
        "contradictions": check_rows(rows),
        "resumed_stages": runner.skipped if runner is not None else [],
        "seconds": {r["name"]: r.get("seconds", math.nan) for r in rows},
    }
    if cfg.out is not None:
        from monquant.experiments.robustness.report import render_robustness

        render_robustness(results, Path(cfg.out))
    return results
