"""Training and evaluation loops: float training, STE QAT and margin-aware QAT.

One loop serves every variant. A variant only changes which weight the forward solve sees
(``MonDEQLayer.weight_transform``: identity for float training, STE fake quantization ``Q_b(W)``
for QAT) and which penalty is added to the loss (margin-aware training). Batches come from one
seeded permutation per epoch (``seed``, ``epoch``), so an interrupted run resumed from its last
checkpoint reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch.nn import functional as F

from monquant.data import take_rows
from monquant.errors import ConfigError, MonquantError
from monquant.model import MonDEQClassifier
from monquant.multitier_model import MultiTierMonDEQLayer, check_qat_parts, fake_quant_tiers
from monquant.progress import progress_bar
from monquant.quant.uniform import check_bits, fake_quant
from monquant.solvers import SolverConfig
from monquant.training import distributed as dist
from monquant.training.optim import Adam, StepDecay
from monquant.training.robust import lipschitz_margin_loss
from monquant.verified import margin_bounds, margin_verdict

__all__ = [
    "EvalResult",
    "TrainConfig",
    "TrainHooks",
    "TrainingDivergedError",
    "epoch_generator",
    "evaluate",
    "install_qat",
    "proved_margin_bounds",
    "train",
    "training_solver_config",
    "training_tolerance",
]


class TrainingDivergedError(MonquantError):
    """Training produced a non-finite loss (the run cannot continue meaningfully)."""


@dataclass
class TrainConfig:
    """Optimisation settings (paper defaults: Adam 1e-3, 15 epochs, x0.1 at epoch 10, batch 128).

    ``qat_bits``: train with the forward solve on ``Q_b(W)`` and STE gradients (QAT);
    ``qat_parts`` names what is fake-quantized: ``W`` (default, the paper's text) and optionally
    ``U`` and ``b`` (the paper's QAT script quantizes all three; ``b`` per tensor).
    ``margin_target`` / ``margin_weight``: margin-aware penalty
    ``weight * relu(target - margin(Q_b(W)))`` through a differentiable smallest eigenvalue.
    ``robust_eps``: Lipschitz-margin training (:mod:`monquant.training.robust`): the loss is the
    cross-entropy with every wrong logit raised by ``robust_eps * L_kj``, which raises the
    certified L2 radius of the model the forward pass uses (``Q_b(W)`` under QAT).
    ``fast_spectral``: training solves estimate ``m`` and ``L`` instead of computing exact
    eigen/singular values every batch, and PR/DR take the ``geometric`` step ``1/sqrt(m L)``
    (:data:`~monquant.solvers.STEP_POLICIES`; a model's explicit ``step`` is kept). PR/DR converge at
    every step; FB still needs the exact margin. Evaluation solves always use the exact constants
    and the model's own step policy.
    ``train_tol_start``: the training solves of the first epoch (forward, and adjoint unless the
    model sets its own ``backward_tol``) stop at this relative residual, and the tolerance
    tightens geometrically to the model's own ``tol`` at the last epoch
    (:func:`training_tolerance`); ``None`` (default): every training solve at ``tol``.
    Evaluations, checkpoints and certificates always use ``tol``; a training solve that misses
    its looser tolerance is still counted as unconverged. The schedule is spaced over
    ``epochs``: a run extended on resume re-spaces its remaining epochs.
    """

    epochs: int = 15
    lr: float = 1e-3
    batch_size: int = 128
    decay_epoch: int = 10
    decay: float = 0.1
    seed: int = 0
    qat_bits: int | None = None
    qat_granularity: str = "per-tensor"
    qat_parts: list[str] = field(default_factory=lambda: ["W"])
    margin_target: float | None = None
    margin_weight: float = 1.0
    robust_eps: float | None = None
    eval_batch_size: int = 2000
    fast_spectral: bool = True
    train_tol_start: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be >= 1")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not 0 < self.decay <= 1 or self.decay_epoch < 1:
            raise ConfigError("decay must be in (0, 1] and decay_epoch >= 1")
        if self.qat_bits is not None:
            self.qat_bits = check_bits(self.qat_bits)
        self.qat_parts = list(self.qat_parts)
        if self.robust_eps is not None and not (math.isfinite(self.robust_eps) and self.robust_eps >= 0):
            raise ConfigError(f"robust_eps must be a finite number >= 0, got {self.robust_eps}")
        if not self.qat_parts or not set(self.qat_parts) <= {"W", "U", "b"}:
            raise ConfigError(f"qat_parts must name some of W, U, b, got {self.qat_parts}")
        t0 = self.train_tol_start
        if t0 is not None and not (isinstance(t0, (int, float)) and math.isfinite(t0) and 0 < t0 < 1):
            raise ConfigError(f"train_tol_start must be a number in (0, 1), got {t0!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalResult:
    """Accuracy and solver statistics of one evaluation pass."""

    accuracy: float
    loss: float
    samples: int
    converged: int
    unconverged: int
    diverged: int
    mean_iterations: float
    max_iterations: int
    seconds: float
    #: the largest final relative residual over every sample (all batches)
    max_residual: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def converged_fraction(self) -> float:
        return self.converged / max(self.samples, 1)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["converged_fraction"] = self.converged_fraction
        return d


@dataclass
class TrainHooks:
    """Extension points of :func:`train` (ProxQuant, custom penalties, freezing schedules).

    ``penalty(model)`` is added to the loss (``None`` for nothing); ``after_step(model, step)``
    runs after every optimizer step (``step`` counts from 0 over the whole run, so it is the same
    after a resume); ``on_epoch_start(model, epoch)`` / ``on_epoch_end(model, epoch)`` bracket
    each epoch (0-based).
    """

    penalty: Callable[[MonDEQClassifier], torch.Tensor | None] | None = None
    after_step: Callable[[MonDEQClassifier, int], None] | None = None
    on_epoch_start: Callable[[MonDEQClassifier, int], None] | None = None
    on_epoch_end: Callable[[MonDEQClassifier, int], None] | None = None


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator that orders epoch ``epoch``'s batches (depends only on seed and epoch)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))


def install_qat(
    model: MonDEQClassifier,
    bits: int | None,
    granularity: str = "per-tensor",
    parts: tuple[str, ...] | list[str] = ("W",),
) -> None:
    """Make the forward solve use ``Q_b(W)`` (and ``Q_b(U)``, ``Q_b(b)`` when ``parts`` names
    them; ``b`` per tensor) with STE gradients (``bits=None`` removes the one on ``W``).

    A ``factor_transform`` installed by the caller (e.g. mixed-precision ``U``) is replaced only
    when ``parts`` names ``U`` or ``b``."""
    layer = model.layer
    if bits is None:
        layer.weight_transform = None
        return
    b = check_bits(bits)
    if isinstance(layer, MultiTierMonDEQLayer):  # every composite kernel, each on its own grid
        check_qat_parts(parts)
        layer.weight_transform = lambda op: fake_quant_tiers(op, b, granularity)
        return
    layer.weight_transform = (lambda W: fake_quant(W, b, granularity)) if "W" in parts else None
    extra = {p: ("per-tensor" if p == "b" else granularity) for p in parts if p in ("U", "b")}
    if extra:
        layer.factor_transform = lambda name, t: fake_quant(t, b, extra[name]) if name in extra else t


def margin_penalty(model: MonDEQClassifier, cfg: TrainConfig) -> torch.Tensor | None:
    """Margin-aware penalty ``relu(tau - lmin(sym(I - W_used)))`` (differentiable eigenvalue).

    ``W_used`` is ``Q_b(W)`` under QAT (STE through the rounding), so the penalty pushes the
    *quantized* operator's exact margin above ``tau``.
    """
    if cfg.margin_target is None:
        return None
    layer = model.layer
    lmin = layer.margin_of(layer.effective_weight())
    return cfg.margin_weight * F.relu(cfg.margin_target - lmin)


@torch.no_grad()
def evaluate(
    model: MonDEQClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 2000,
    W: torch.Tensor | None = None,
    U: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    progress: bool = False,
    desc: str = "evaluate",
) -> EvalResult:
    """Accuracy of ``model`` (optionally with replacement weights ``W``/``U``/``b``).

    A sample whose solve did not converge (or diverged) still gets a prediction, but it is
    counted in ``unconverged``; non-finite logits count as wrong. ``progress`` shows a bar over
    the samples on stderr.
    """
    t0 = time.perf_counter()
    correct, loss_sum = 0, 0.0
    conv = div = 0
    iters, residuals = [], []
    bar = progress_bar(desc=desc, enabled=progress, total=x.shape[0], unit="img")
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        logits = model(xb, W=W, U=U, b=b)
        r = model.solver.last_forward
        assert r is not None
        conv += int(r.converged.sum())
        div += int(r.diverged.sum())
        iters.append(r.sample_iterations)
        residuals.append(r.residual.reshape(-1))
        finite = torch.isfinite(logits).all(dim=1)
        pred = logits.argmax(dim=1)
        correct += int(((pred == yb) & finite).sum())
        if bool(finite.all()):
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        else:
            loss_sum = math.nan
        bar.update(xb.shape[0])
    bar.close()
    it = torch.cat(iters)
    n = x.shape[0]
    return EvalResult(
        accuracy=correct / n,
        loss=loss_sum / n,
        samples=n,
        converged=conv,
        unconverged=n - conv,
        diverged=div,
        mean_iterations=float(it.double().mean()),
        max_iterations=int(it.max()),
        max_residual=float(torch.cat(residuals).max()),  # nan/inf propagate: nothing hidden
        seconds=time.perf_counter() - t0,
    )



def training_tolerance(cfg: TrainConfig, tol: float, epoch: int) -> float:
    """The relative-residual tolerance of epoch ``epoch``'s (0-based) training solves:
    ``t0 (tol / t0)^(epoch / (epochs - 1))`` from ``t0 = cfg.train_tol_start`` at the first epoch
    to ``tol`` at the last (``tol`` itself without a start, or for a one-epoch run). Raises
    :class:`ConfigError` when the start is tighter than ``tol``."""
    t0 = cfg.train_tol_start
    if t0 is None:
        return tol
    if t0 < tol:
        raise ConfigError(f"train_tol_start {t0:g} is tighter than the solver's tol {tol:g}: the "
                          "training tolerance starts loose and tightens to tol")  # fmt: skip
    if cfg.epochs == 1 or epoch >= cfg.epochs - 1:
        return tol
    return t0 * (tol / t0) ** (epoch / (cfg.epochs - 1))


def training_solver_config(cfg: TrainConfig, own: SolverConfig, epoch: int) -> SolverConfig:
    """The settings of epoch ``epoch``'s training solves: the model's own ``own`` at
    :func:`training_tolerance`, and under ``cfg.fast_spectral`` with estimated constants and the
    geometric step (uncertified; evaluation, checkpoints and certificates keep ``own``)."""
    fast = {"spectral": "estimate", "step_policy": "geometric"} if cfg.fast_spectral else {}
    return replace(own, tol=training_tolerance(cfg, own.tol, epoch), **fast)


def train(
    model: MonDEQClassifier,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    cfg: TrainConfig,
    *,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    resume_state: dict[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[dict[str, Any]], None] | None = None,
    hooks: TrainHooks | None = None,
    optimizer: Any = None,
    scheduler: Any = None,
) -> list[dict[str, Any]]:
    """Train ``model`` and return the per-epoch log.

    ``optimizer``: any ``torch.optim.Optimizer`` (an instance over ``model``'s parameters, or a
    factory ``params -> optimizer``); default the lean built-in Adam at ``cfg.lr``
    (:mod:`monquant.training.optim`, which avoids the ~70 MB that importing ``torch.optim``'s
    machinery costs). ``scheduler``: any LR scheduler with ``step()`` once per epoch (an instance,
    or a factory ``optimizer -> scheduler``); default the step decay of ``cfg`` with the built-in
    Adam and none with a given optimizer. Both are checkpointed through their ``state_dict``.

    ``checkpoint(state)`` is called after every epoch with everything needed to resume
    (model, optimizer, epoch, history); ``resume_state`` is such a state. ``hooks`` adds
    penalties and per-step/per-epoch actions (see :class:`TrainHooks`). Each epoch's log entry
    holds loss, train/test accuracy, m, L, kappa, solver iterations, unconverged solves, seconds.
    """
    if cfg.qat_bits is not None:  # leave a transform installed by the caller alone otherwise
        install_qat(model, cfg.qat_bits, cfg.qat_granularity, cfg.qat_parts)
    if optimizer is None:
        opt: Any = Adam(model.parameters(), lr=cfg.lr)
        sched: Any = StepDecay(opt, step_size=cfg.decay_epoch, gamma=cfg.decay)
    else:
        opt = optimizer(model.parameters()) if callable(optimizer) else optimizer
        sched = None
    if scheduler is not None:
        sched = scheduler(opt) if callable(scheduler) and not hasattr(scheduler, "step") else scheduler
    history: list[dict[str, Any]] = []
    start = 0
    if resume_state is not None:
        opt.load_state_dict(resume_state["optimizer"])
        if sched is not None and resume_state.get("scheduler") is not None:
            sched.load_state_dict(resume_state["scheduler"])
        history = list(resume_state["history"])
        start = int(resume_state["epoch"])
    n = x_train.shape[0]
    solver = model.solver
    ddp = dist.wrap(model) if dist.world()[1] > 1 else None  # built once: it owns the hooks
    training_tolerance(cfg, solver.forward_config.tol, 0)  # a start tighter than tol fails here
    hk = hooks or TrainHooks()
    for epoch in range(start, cfg.epochs):
        model.train()
        if hk.on_epoch_start is not None:
            hk.on_epoch_start(model, epoch)
        training = training_solver_config(cfg, solver.forward_config, epoch)
        solver.reset()  # each epoch starts cold: a resumed run repeats it exactly
        before = solver.counters.summary()
        t0 = time.perf_counter()
        # only the training solves run fast (uncertified) and loose; the block restores the model's own
        with solver.configured(training):
            loss_sum, correct = _train_one_epoch(
                model, opt, x_train, y_train, cfg, hk, epoch, progress, ddp
            )
            if sched is not None:
                sched.step()
            if hk.on_epoch_end is not None:
                hk.on_epoch_end(model, epoch)
        train_seconds = time.perf_counter() - t0
        after = solver.counters.summary()
        model.eval()
        ev = evaluate(model, x_test, y_test, cfg.eval_batch_size)
        entry = _epoch_entry(
            model, epoch, n, loss_sum, correct, ev, before, after, train_seconds
        )
        entry["train_tol"] = training.tol
        history.append(entry)
        if log is not None:
            log(entry)
        if checkpoint is not None:
            checkpoint(
                {
                    "epoch": epoch + 1,
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict() if sched is not None else None,
                    "history": history,
                }
            )
    return history


def _train_one_epoch(
    model: MonDEQClassifier,
    opt: Any,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    cfg: TrainConfig,
    hk: TrainHooks,
    epoch: int,
    progress: bool,
    ddp: Any = None,
) -> tuple[float, float]:
    """One pass over the training set in the epoch's seeded order; returns (loss sum, correct)."""
    n = x_train.shape[0]
    nb = math.ceil(n / cfg.batch_size)
    perm = torch.randperm(n, generator=epoch_generator(cfg.seed, epoch)).to(x_train.device)
    loss_sum = correct = 0.0
    params = getattr(opt, "params", None) or [p for g in opt.param_groups for p in g["params"]]
    rank, size = dist.world()
    forward = ddp if ddp is not None else model  # DDP: one gradient all-reduce per step
    bar = progress_bar(desc=f"epoch {epoch + 1}/{cfg.epochs}", enabled=progress and rank == 0,
                       total=nb)  # fmt: skip
    for i in range(nb):
        glob = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        idx = dist.shard(glob, rank, size)
        xb, yb = take_rows(x_train, idx), take_rows(y_train, idx)
        logits = forward(xb)
        loss = F.cross_entropy(logits, yb)
        if not bool(torch.isfinite(loss)):
            raise TrainingDivergedError(
                f"training diverged at epoch {epoch + 1}, batch {i + 1}: the loss is "
                f"{float(loss.detach())} (non-finite logits; the quantized operator may have lost "
                "monotonicity)"
            )
        total = loss if not cfg.robust_eps else lipschitz_margin_loss(model, logits, yb, cfg.robust_eps)
        if size > 1:  # DDP averages over ranks: weigh each shard so the mean is the global one's
            total = total * (size * xb.shape[0] / glob.shape[0])
        for pen in (margin_penalty(model, cfg), hk.penalty(model) if hk.penalty else None):
            if pen is not None:
                total = total + pen
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if not _finite_params(params):
            raise TrainingDivergedError(
                f"training diverged at epoch {epoch + 1}, batch {i + 1}: parameters became "
                "non-finite after the optimizer step (non-finite gradients)"
            )
        if hk.after_step is not None:
            hk.after_step(model, epoch * nb + i)
        loss_sum += float(loss.detach()) * xb.shape[0]
        correct += float((logits.detach().argmax(1) == yb).sum())
        if progress and (i % 20 == 0 or i == nb - 1):
            bar.set_postfix(
                loss=f"{loss_sum / ((i * cfg.batch_size) + xb.shape[0]):.4f}",
                it=f"{model.solver.last_forward.sample_iterations.double().mean():.1f}",
            )
        bar.update(1)
    bar.close()
    if size > 1:
        loss_sum, correct = dist.all_reduce_sum(loss_sum, correct)
    return loss_sum, correct


def _finite_params(params: list[torch.Tensor]) -> bool:
    """Whether every parameter is finite, by one multi-tensor reduction (a NaN or inf entry makes
    its norm, and so the total, non-finite; only an overflowing total falls back to the entrywise
    test)."""
    with torch.no_grad():
        total = torch.stack(torch._foreach_norm([p.detach() for p in params])).sum()
    return bool(torch.isfinite(total)) or all(bool(torch.isfinite(p).all()) for p in params)


def proved_margin_bounds(layer: Any, W: torch.Tensor) -> tuple[float, float, float]:
    """``(lower, upper, computed)`` for ``margin`` of the operator of ``W`` (a dense weight, a
    convolutional layer's kernel, or a multi-tier operator: its Weyl bound against the layer's
    float operator and the diagonal blocks' upper bound): the bounds are proved, ``computed`` is
    an estimate."""
    if not isinstance(W, torch.Tensor):
        from monquant.certify_multitier import certify_multitier

        c = certify_multitier(layer.reference_weight(), tilde=W.detach())
        return c.margin_quantized_lower, c.margin_quantized_upper, c.margin_quantized
    if W.dim() == 4:
        from monquant.certify_conv import conv_spectral_bounds

        b = conv_spectral_bounds(W, layer.image, norm=False)
        return b.m_lo, b.m_hi, b.m
    return margin_bounds(W)


def _epoch_entry(model, epoch, n, loss_sum, correct, ev, before, after, seconds) -> dict[str, Any]:
    layer = model.layer
    st = layer.operator_of(layer.reference_weight()).spectral_stats()
    d_fwd = after["forward_samples"] - before["forward_samples"]
    d_unc = after["forward_unconverged"] - before["forward_unconverged"]
    d_bwd_unc = after["backward_unconverged"] - before["backward_unconverged"]
    d_it = after["forward_iterations"] - before["forward_iterations"]
    if dist.world()[1] > 1:  # every rank's solves count (each solved its own shard)
        d_fwd, d_unc, d_bwd_unc, d_it = (int(v) for v in dist.all_reduce_sum(d_fwd, d_unc,
                                                                             d_bwd_unc, d_it))  # fmt: skip
    entry = {
        "epoch": epoch + 1,
        "loss": loss_sum / n,
        "train_accuracy": correct / n,
        "test_accuracy": ev.accuracy,
        "test_loss": ev.loss,
        "m_param": float(model.layer.margin().detach()),
        "m": st.m,
        "L": st.L,
        "kappa": st.kappa,
        "train_solves": d_fwd,
        "train_unconverged": d_unc,
        "backward_unconverged": d_bwd_unc,
        "mean_iterations": ev.mean_iterations,
        "max_iterations": ev.max_iterations,
        "test_unconverged": ev.unconverged,
        "train_mean_iterations": d_it / max(d_fwd, 1),
        "seconds": seconds,
        "eval_seconds": ev.seconds,
    }
    if model.layer.weight_transform is not None:
        lo, hi, computed = proved_margin_bounds(layer, layer.effective_weight().detach())
        entry["margin_quantized"] = computed  # an estimate
        entry["margin_quantized_lower"] = lo  # proved
        entry["margin_quantized_verdict"] = margin_verdict(lo, hi)
    return entry
