"""``monquant conv``: the paper's experiments on a single-convolution MonDEQ, beside the dense one.

Stages (each saved to ``<out>/stages/<name>.json`` when it ends; ``resume=True`` skips finished
stages, and an interrupted training resumes from its per-epoch checkpoint):

1. ``train_conv`` / ``train_fc`` / ``train_multitier``: float models (the conv model: ``channels``
   channels, ``kernel x kernel`` factors, PR; the dense one: the paper's 100-unit setup; the
   multi-tier one: ``tier_channels`` on 28 x 28, 14 x 14, 7 x 7) trained on MNIST;
2. ``phase_<model>``: the phase transition, for every bit-width in ``bits`` and both
   granularities: the certificate of PTQ of ``W`` (the conv model's composite kernel, certified
   from its Fourier blocks; the multi-tier model's composite kernels, by the Weyl tier with a
   proved ``||dW||``) and the quantized model's accuracy and unconverged solves on the
   first ``phase_test_limit`` test images;
3. ``displacement``: Theorem 3 on ``displacement_samples`` test inputs in float64 (PR,
   ``tol``), with the solvers' a-posteriori errors (the conv model, per-channel);
4. ``qat``: fine-tuning at low bits, per-channel (``ste``, ``margin``, ``proxquant-factors``)
   from the float conv model on ``qat_train_limit`` training images, each deployed and certified,
   evaluated on the whole test set;
5. ``compare_tiers``: the side-by-side table (accuracy, parameters, weight storage, margins, smallest
   certified bits, solver iterations, epoch time).
"""

from __future__ import annotations

import copy
import math
import shlex
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from monquant.data import MNIST, random_subset, subset
from monquant.errors import ConfigError
from monquant.experiments.stages import StageRunner

__all__ = ["QAT_ROWS", "ConvStudyConfig", "run_conv_study"]

Echo = Callable[[str], None] | None


#: the full study's low-bit configurations: the three methods at 4 bits, and ProxQuant on the factors
#: at 2 bits (monotone by construction). STE and margin-aware training at 2 bits run on an operator
#: that is not monotone, so every solve runs to its cap (over an hour each on a 2-core CPU); they
#: are available by ``--qat-rows ste:2 margin:2``.
QAT_ROWS: tuple[tuple[str, int], ...] = (
    ("ste", 4), ("margin", 4), ("proxquant-factors", 4), ("proxquant-factors", 2))  # fmt: skip


@dataclass
class ConvStudyConfig:
    """Settings of ``monquant conv`` (defaults: the full study; :meth:`quick_config` for CI)."""

    out: Path = Path("results/conv")
    channels: int = 16
    kernel: int = 3
    epochs: int = 5
    lr: float = 2e-3
    decay_epoch: int = 4
    margin_init: float = 0.5
    fc_epochs: int = 15
    tier_channels: tuple[int, ...] = (4, 8, 16)
    multitier_epochs: int = 2
    train_limit: int | None = None
    bits: tuple[int, ...] = tuple(range(2, 17))
    phase_test_limit: int | None = 2000
    test_limit: int | None = None
    displacement_samples: int = 2560
    displacement_bits: tuple[int, ...] = (4, 6, 8, 12, 16)
    tol: float = 1e-10
    #: the low-bit configurations ``(kind, bits)``. ``None``: every one of ``qat_kinds`` (default all
    #: three) at every one of ``qat_bits`` (default 4) when either is given, else :data:`QAT_ROWS`
    qat_rows: tuple[tuple[str, int], ...] | None = None
    qat_kinds: tuple[str, ...] | None = None
    qat_bits: tuple[int, ...] | None = None
    qat_epochs: int = 1
    qat_train_limit: int = 10_000
    seed: int = 0
    resume: bool = False
    progress: bool = True
    quick: bool = False
    #: where the independent trainings and low-bit configurations run (``monquant.executors``)
    executor: str = "serial"
    workers: int | None = None
    address: str | None = None
    worker_threads: int | None = None
    command: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from monquant.quant.uniform import check_bits
        from monquant.training.methods import KINDS

        self.out = Path(self.out)
        self.bits = tuple(check_bits(b) for b in self.bits)
        self.displacement_bits = tuple(check_bits(b) for b in self.displacement_bits)
        if self.qat_rows is None and self.qat_kinds is None and self.qat_bits is None:
            self.qat_rows = QAT_ROWS
        elif self.qat_rows is None:
            self.qat_rows = tuple((k, b) for k in (self.qat_kinds or ("ste", "margin", "proxquant-factors"))
                                  for b in (self.qat_bits or (4,)))  # fmt: skip
        self.qat_rows = tuple((str(k), check_bits(b)) for k, b in self.qat_rows)
        bad = [k for k, _ in self.qat_rows if k not in KINDS or k in ("ptq", "proxquant-w")]
        if bad:
            raise ConfigError(f"qat kinds for a conv model: ste, margin, proxquant-factors; got {bad}")
        if len(set(self.qat_rows)) != len(self.qat_rows):
            raise ConfigError(f"a low-bit configuration is named twice in {list(self.qat_rows)}")
        self.tier_channels = tuple(int(c) for c in self.tier_channels)
        if len(self.tier_channels) < 2 or min(self.tier_channels) < 1:
            raise ConfigError("tier_channels needs two or more positive counts, got "
                              f"{list(self.tier_channels)}")  # fmt: skip
        for name in ("channels", "epochs", "fc_epochs", "multitier_epochs", "qat_epochs",
                     "displacement_samples", "qat_train_limit"):  # fmt: skip
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if not 0 < self.tol < 1e-3:
            raise ConfigError(f"tol must be in (0, 1e-3), got {self.tol}")
        self.executor_spec()  # checked here, before any data loads

    def executor_spec(self) -> Any:
        from monquant.executors import ExecutorSpec

        return ExecutorSpec(self.executor, self.workers, self.address, self.worker_threads)

    @classmethod
    def quick_config(cls, **kw: Any) -> ConvStudyConfig:
        """A CI-sized run of the same pipeline: 4 channels, 1 epoch on 2,000 images, fewer bits."""
        base = dict(channels=4, epochs=1, fc_epochs=1, tier_channels=(1, 2, 2), multitier_epochs=1,
                    train_limit=2000, bits=(2, 4, 8),
                    phase_test_limit=300, test_limit=500, displacement_samples=64,
                    displacement_bits=(4, 8), qat_rows=(("ste", 4), ("proxquant-factors", 4)),
                    qat_train_limit=500, decay_epoch=1, quick=True)  # fmt: skip
        if kw.get("qat_kinds") is not None or kw.get("qat_bits") is not None:
            base["qat_rows"] = None  # the product of the given kinds and bits replaces the rows
        base.update({k: v for k, v in kw.items() if v is not None})
        return cls(**base)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def _limited(data: MNIST, n: int | None) -> MNIST:
    if n is None or n >= data.x_train.shape[0]:
        return data
    import dataclasses

    x, y = subset(data.x_train, data.y_train, n)
    return dataclasses.replace(data, x_train=x, y_train=y)


def _train(cfg: ConvStudyConfig, data: MNIST, arch: str, echo: Echo) -> dict[str, Any]:
    from monquant.training.runs import TrainRequest, run_training

    if arch == "conv":
        req = TrainRequest.of(cfg.out / "conv-float", arch="conv", channels=cfg.channels,
                              kernel=cfg.kernel, margin_init=cfg.margin_init, epochs=cfg.epochs,
                              lr=cfg.lr, decay_epoch=cfg.decay_epoch, seed=cfg.seed,
                              resume=True, progress=cfg.progress)  # fmt: skip
    elif arch == "multitier":
        req = TrainRequest.of(cfg.out / "multitier-float", arch="multitier",
                              tier_channels=cfg.tier_channels, kernel=cfg.kernel,
                              margin_init=cfg.margin_init, epochs=cfg.multitier_epochs, lr=cfg.lr,
                              decay_epoch=cfg.decay_epoch, seed=cfg.seed, resume=True,
                              progress=cfg.progress)  # fmt: skip
    else:
        req = TrainRequest.of(cfg.out / "fc-float", epochs=cfg.fc_epochs, seed=cfg.seed,
                              decay_epoch=min(10, cfg.fc_epochs), resume=True,
                              progress=cfg.progress)  # fmt: skip
    r = run_training(req, _limited(data, cfg.train_limit), echo=echo)
    return {"model": r["model"], "history": r["history"], "seconds": r["seconds"]}


def _train_task(data: MNIST, cfg: ConvStudyConfig, arch: str, echo: Echo) -> dict[str, Any]:
    return _train(cfg, data, arch, echo)


def _quantizer(model: Any) -> Callable[[int, str], tuple[Any, Any]]:
    """``(bits, granularity) -> (certificate, W~ for the forward pass)`` for PTQ of ``model``'s
    operator: the dense ``W``, the conv composite kernel (certified from its Fourier blocks) or
    the multi-tier composite kernels (Weyl tier with a proved ``||dW||``). The certificate is of
    the ``W~`` the forward pass runs on (in the model's dtype). The float side is proved once."""
    import dataclasses

    from monquant.certify import certify
    from monquant.certify_conv import certify_conv, conv_spectral_bounds
    from monquant.certify_multitier import certify_deployed, multitier_float_bounds
    from monquant.conv_model import ConvMonDEQClassifier
    from monquant.multitier_model import MultiTierMonDEQClassifier
    from monquant.quant.uniform import quantize
    from monquant.verified import spectral_bounds

    dtype = model.head.weight.dtype
    if isinstance(model, MultiTierMonDEQClassifier):
        op = model.layer.reference_weight()
        fb = multitier_float_bounds(op)

        def multitier(b: int, g: str) -> tuple[Any, Any]:
            return certify_deployed(op, b, g, dtype=dtype, device=model.head.weight.device,
                                    float_bounds=fb)  # fmt: skip

        return multitier
    W = model.layer.reference_weight().to(torch.float64)
    if isinstance(model, ConvMonDEQClassifier):
        image = model.config.image
        st = conv_spectral_bounds(W, image)

        def conv(b: int, g: str) -> tuple[Any, Any]:
            Wt = quantize(W, b, g).dequantized().to(dtype)
            c = certify_conv(W, image, kernel_tilde=Wt, float_bounds=st)
            return dataclasses.replace(c, bits=b, granularity=g, step_rule="paper"), Wt

        return conv
    st = spectral_bounds(W)

    def dense(b: int, g: str) -> tuple[Any, Any]:
        return certify(W, b, g, float_bounds=st), quantize(W, b, g).dequantized().to(dtype)

    return dense


def _phase(cfg: ConvStudyConfig, model: Any, data: MNIST) -> dict[str, Any]:
    """Certificates and PTQ accuracy over ``bits`` x granularities."""
    from monquant.certify import min_bits_of
    from monquant.progress import progress_bar
    from monquant.training.loop import evaluate

    x, y = subset(data.x_test, data.y_test, cfg.phase_test_limit)
    quantized = _quantizer(model)
    rows = []
    certs: dict[str, list[Any]] = {}
    grans = ("per-tensor", "per-channel")
    bar = progress_bar(desc="phase transition", enabled=cfg.progress, total=len(grans) * len(cfg.bits))
    for g in grans:
        for b in cfg.bits:
            c, Wt = quantized(b, g)
            certs.setdefault(g, []).append(c)
            ev = evaluate(model, x, y, W=Wt)
            rows.append({"granularity": g, "bits": b, "verdict": c.verdict, "tier": c.tier,
                         "margin_quantized_lower": c.margin_quantized_lower,
                         "margin_quantized": c.margin_quantized, "dW_norm": c.dW_norm,
                         "dW_norm_upper": c.dW_norm_upper, "dW_over_m": c.dW_over_m,
                         "accuracy": ev.accuracy, "unconverged": ev.unconverged,
                         "mean_iterations": ev.mean_iterations})  # fmt: skip
            bar.update(1)
    bar.close()
    return {"rows": rows, "min_bits": {g: min_bits_of(cs) for g, cs in certs.items()},
            "samples": int(x.shape[0])}  # fmt: skip


def _qat_row(data: MNIST, cfg: ConvStudyConfig, model_path: str, kind: str, b: int) -> dict[str, Any]:
    """One low-bit configuration of the conv model: fine-tune, deploy, certify, evaluate (a task:
    it loads the float model itself, so it runs in any worker)."""
    from monquant.storage.checkpoints import load_model
    from monquant.training.loop import evaluate
    from monquant.training.methods import QuantMethod, deployed_weights, finetune_method

    xt, yt = subset(data.x_test, data.y_test, cfg.test_limit)
    x, y = random_subset(data.x_train, data.y_train, min(cfg.qat_train_limit, data.x_train.shape[0]),
                         cfg.seed, keep_codes=True)  # fmt: skip
    method = QuantMethod.default(kind, b, "per-channel")
    m = load_model(model_path).model
    torch.manual_seed(cfg.seed)
    prep, hist = finetune_method(m, method, x, y, cfg.qat_epochs, seed=cfg.seed)
    d = deployed_weights(m, method, prep)
    m.layer.weight_transform = m.layer.factor_transform = None
    ev = evaluate(m, xt, yt, **d.overrides())
    return {"kind": kind, "bits": b, "label": method.label, "status": "ok", **d.summary(),
            "accuracy": ev.accuracy, "unconverged": ev.unconverged,
            "mean_iterations": ev.mean_iterations, "events": prep.events,
            "train_unconverged": sum(h["train_unconverged"] for h in hist)}  # fmt: skip


def _qat(cfg: ConvStudyConfig, runner: StageRunner, model_path: str, data: MNIST) -> dict[str, Any]:
    """Every low-bit configuration as its own stage ``qat_<kind>_<bits>``, run as tasks on the
    study's executor (finished ones are skipped on resume, so a configuration can be added to a
    finished study). A failed one is a row with its error (reported, never dropped; not saved, so
    ``--resume`` retries it)."""
    from monquant.executors import Task, TaskFailure
    from monquant.experiments.stages import run_task_stages
    from monquant.training.methods import QuantMethod

    assert cfg.qat_rows is not None
    tasks = [Task(f"qat_{kind}_{b}", _qat_row, (cfg, model_path, kind, b)) for kind, b in cfg.qat_rows]
    rows = run_task_stages(runner, cfg.executor_spec(), tasks, data, keep_failures=True)
    for task in tasks:
        failure = rows[task.name]
        if isinstance(failure, TaskFailure):
            kind, b = task.args[2], task.args[3]
            rows[task.name] = {"kind": kind, "bits": b, "status": "failed", "error": failure.error,
                               "label": QuantMethod.default(kind, b, "per-channel").label}  # fmt: skip
    samples = subset(data.x_test, data.y_test, cfg.test_limit)[0].shape[0]
    return {"rows": [rows[t.name] for t in tasks], "samples": int(samples)}


def _describe(model: Any, train: dict[str, Any], phase: dict[str, Any], ev: Any) -> dict[str, Any]:
    from monquant.certify_conv import conv_spectral_bounds
    from monquant.certify_multitier import multitier_float_bounds
    from monquant.conv_model import ConvMonDEQClassifier
    from monquant.multitier_model import MultiTierMonDEQClassifier
    from monquant.verified import spectral_bounds

    layer = model.layer
    k = model.config.kernel if hasattr(model.config, "kernel") else 0
    if isinstance(model, MultiTierMonDEQClassifier):
        fb = multitier_float_bounds(layer.reference_weight())
        st, size = fb.bounds, fb.comp.size
        n_W = sum(int(K.numel()) for K in (*fb.comp.diag, *fb.comp.down))
        arch = ("multi-tier " + ", ".join(f"{c}x{h}x{w}" for c, (h, w) in
                                          zip(model.config.tier_channels, model.config.images, strict=True))
                + f", {k}x{k} factors")  # fmt: skip
    else:
        W = layer.reference_weight().to(torch.float64)
        conv = isinstance(model, ConvMonDEQClassifier)
        st = conv_spectral_bounds(W, model.config.image) if conv else spectral_bounds(W)
        size, n_W = (int(W.shape[0]) * 784 if conv else int(W.shape[0])), int(W.numel())
        arch = (f"conv {model.config.channels}x28x28, {k}x{k} factors" if conv
                else f"dense {model.config.hidden} units")  # fmt: skip
    params = sum(p.numel() for p in layer.parameters()) - layer.U.weight.numel() - layer.U.bias.numel()
    hist = train["history"]
    return {
        "architecture": arch,
        "state_size": size,
        "accuracy": ev.accuracy,
        "unconverged": ev.unconverged,
        "mean_iterations": ev.mean_iterations,
        "operator_parameters": int(params),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "W_storage_float32_bits": 32 * n_W,
        "margin": st.m,
        "margin_lower": st.m_lo,
        "L": st.L,
        "min_bits": phase["min_bits"],
        "median_epoch_seconds": statistics.median(h["seconds"] for h in hist),
        "epochs": len(hist),
    }


def run_conv_study(cfg: ConvStudyConfig, data: MNIST, echo: Echo = print) -> dict[str, Any]:
    """Run every stage (skipping finished ones on resume) and write the report in ``cfg.out``."""
    from monquant.executors import Task
    from monquant.experiments.paper.displacement import run_displacement
    from monquant.experiments.stages import run_task_stages
    from monquant.storage.checkpoints import load_model
    from monquant.training.loop import evaluate

    runner = StageRunner(cfg.out, cfg.resume, echo)
    serial = cfg.executor == "serial"
    tasks = [Task(f"train_{a}", _train_task, (cfg, a, echo if serial else None))
             for a in ("fc", "conv", "multitier")]  # fmt: skip
    stages = run_task_stages(runner, cfg.executor_spec(), tasks, data)
    trained = {a: stages[f"train_{a}"] for a in ("fc", "conv", "multitier")}
    models = {a: load_model(t["model"]).model.eval() for a, t in trained.items()}
    phases = {a: runner.run(f"phase_{a}", lambda a=a: _phase(cfg, models[a], data)) for a in models}

    def displacement() -> dict[str, Any]:
        x = data.x_test[: cfg.displacement_samples]
        r = run_displacement(copy.deepcopy(models["conv"]).double(), x, cfg.displacement_bits,
                             tol=cfg.tol, granularity="per-channel")  # fmt: skip
        r.pop("per_sample")
        return r

    disp = runner.run("displacement", displacement)
    qat = _qat(cfg, runner, trained["conv"]["model"], data)

    def compare() -> dict[str, Any]:
        xt, yt = subset(data.x_test, data.y_test, cfg.test_limit)
        return {a: _describe(models[a], trained[a], phases[a], evaluate(models[a], xt, yt))
                for a in models}  # fmt: skip

    comparison = runner.run("compare_tiers", compare)
    results = {
        "config": cfg.as_dict(),
        "command": " ".join(shlex.quote(a) for a in cfg.command),
        "train": {a: {"history": t["history"], "seconds": t["seconds"]} for a, t in trained.items()},
        "phase": phases,
        "displacement": disp,
        "qat": qat,
        "compare": comparison,
        "stage_seconds": runner.timings,
        "resumed_stages": runner.skipped,
        "total_seconds": math.fsum(runner.timings.values()),
    }
    from monquant.experiments.conv.report import render_conv

    render_conv(results, cfg.out)
    return results
