"""Training runs: a run folder trained, checkpointed every epoch and resumable.

A run folder holds ``checkpoint.safetensors`` (rewritten atomically after every epoch, with the
optimizer state, so ``resume=True`` continues exactly), ``model.safetensors`` (the final model)
and ``log.json`` (the per-epoch log and the settings).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monquant.conv_model import ConvMonDEQConfig
from monquant.data import MNIST
from monquant.errors import ConfigError, MonquantError
from monquant.model import MonDEQConfig
from monquant.multitier_model import MultiTierMonDEQConfig, check_qat_parts
from monquant.solvers import SolverConfig
from monquant.storage.checkpoints import Classifier, build_classifier, load_model, save_model
from monquant.storage.files import folder_lock
from monquant.storage.jsonio import write_json
from monquant.training import distributed as dist
from monquant.training.loop import TrainConfig, train, training_tolerance

__all__ = ["TrainRequest", "run_training"]


@dataclass
class TrainRequest:
    """Everything that defines a training run: the model and solver, the optimisation settings
    (one :class:`~monquant.training.loop.TrainConfig`, not a copy of its fields) and the run folder.

    :meth:`of` builds one from flat keyword settings (as the CLI and the studies have them),
    sending each to the model or to ``TrainConfig`` by name; bad settings fail here, before any
    data is loaded.
    """

    out: Path
    #: ``fc`` (the dense MonDEQ of the paper), ``conv`` (a single-convolution MonDEQ with
    #: ``channels`` channels, ``kernel x kernel`` factors and a ``pool x pool`` average pool) or
    #: ``multitier`` (tiers of ``tier_channels`` channels on 28, 14, 7, ... pixels)
    arch: str = "fc"
    hidden: int = 100
    channels: int = 16
    kernel: int = 3
    pool: int = 4
    tier_channels: tuple[int, ...] = (8, 16, 32)
    rank: int | None = None
    margin_init: float = 1.0
    learn_margin: bool = True
    margin_floor: float = 0.0
    init: str = "uniform"
    solver: dict[str, Any] = field(default_factory=lambda: {"method": "pr", "tol": 1e-4})
    backward: str = "splitting"
    train: TrainConfig = field(default_factory=TrainConfig)
    resume: bool = False
    progress: bool = True

    @classmethod
    def of(cls, out: str | Path, **settings: Any) -> TrainRequest:
        """``TrainRequest`` from flat settings: ``TrainConfig`` fields go to ``train``."""
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        train = TrainConfig(**{k: v for k, v in settings.items() if k in names})
        own = {k: v for k, v in settings.items() if k not in names}
        req = cls(out=Path(out), train=train, **own)
        model = req.model_config(784, 10)  # validate the model and solver settings now (MNIST sizes)
        training_tolerance(train, float(model.solver["tol"]), 0)  # a start tighter than tol fails here
        if req.arch != "fc" and train.robust_eps:
            raise ConfigError("robust_eps (Lipschitz-margin training) is implemented for the dense "
                              f"MonDEQ only, not for --arch {req.arch}")  # fmt: skip
        if req.arch == "multitier" and train.margin_target is not None:
            raise ConfigError("margin-aware training (--margin-target) is not implemented for --arch "
                              "multitier: the quantized multi-tier operator has no closed-form margin "
                              "(its certificate is the Weyl tier); use --qat-bits alone (STE)")  # fmt: skip
        if req.arch == "multitier" and train.qat_bits is not None:
            check_qat_parts(train.qat_parts)
        return req

    def model_config(
        self, in_features: int, out_features: int
    ) -> MonDEQConfig | ConvMonDEQConfig | MultiTierMonDEQConfig:
        solver = SolverConfig(**{k: v for k, v in self.solver.items() if v is not None})
        if self.arch in ("conv", "multitier"):
            side = math.isqrt(in_features)
            if side * side != in_features:
                raise ConfigError(f"--arch {self.arch} takes square one-channel images; "
                                  f"{in_features} input features are not a square")  # fmt: skip
        if self.arch == "multitier":
            return MultiTierMonDEQConfig(
                in_channels=1, image=(side, side), tier_channels=tuple(self.tier_channels),
                kernel=self.kernel, rank=self.rank, out_features=out_features,
                margin_init=self.margin_init, learn_margin=self.learn_margin,
                margin_floor=self.margin_floor, solver=solver.as_dict(), backward=self.backward,
            )  # fmt: skip
        if self.arch == "conv":
            return ConvMonDEQConfig(
                in_channels=1, image=(side, side), channels=self.channels, kernel=self.kernel,
                rank=self.rank, out_features=out_features, pool=self.pool,
                margin_init=self.margin_init, learn_margin=self.learn_margin,
                margin_floor=self.margin_floor, solver=solver.as_dict(), backward=self.backward,
            )  # fmt: skip
        if self.arch != "fc":
            raise ConfigError(f"arch must be 'fc', 'conv' or 'multitier', got {self.arch!r}")
        return MonDEQConfig(
            in_features=in_features,
            hidden=self.hidden,
            out_features=out_features,
            rank=self.rank,
            margin_init=self.margin_init,
            learn_margin=self.learn_margin,
            margin_floor=self.margin_floor,
            init=self.init,
            solver=solver.as_dict(),
            backward=self.backward,
        )

    def train_config(self) -> TrainConfig:
        return self.train


def _settings(req: TrainRequest, model: Classifier, data: MNIST) -> dict[str, Any]:
    return {
        "model": model.config.as_dict(),
        "train": req.train_config().as_dict(),
        "seed": req.train.seed,
        "threads": torch.get_num_threads(),
        "world_size": dist.world()[1],
        "data": {"source": str(data.source), "md5": data.md5},
    }


def _check_resumable(
    ckpt: Path, stored: dict[str, Any], req: TrainRequest, data: MNIST, cfg: TrainConfig
) -> None:
    """Refuse to resume when anything but the number of epochs differs from the stored run."""
    wanted_model = req.model_config(data.x_train.shape[1], 10).as_dict()
    diffs = []
    new_train = cfg.as_dict()
    # a setting added after the run was stored counts as its default (older runs stay resumable)
    defaults = TrainConfig().as_dict()
    st_train = {**defaults, **dict(stored.get("train") or {})} if stored.get("train") else {}
    st_train.pop("epochs", None)
    new_train.pop("epochs", None)
    if st_train and st_train != new_train:
        keys = sorted(k for k in new_train if st_train.get(k) != new_train[k])
        diffs.append(f"training settings {keys}")
    st_model = stored.get("model")
    if st_model and st_model != wanted_model:
        keys = sorted(k for k in wanted_model if st_model.get(k) != wanted_model[k])
        diffs.append(f"model/solver settings {keys}")
    st_data = (stored.get("data") or {}).get("md5")
    if st_data and st_data != data.md5:
        diffs.append("the data files (checksums differ)")
    if diffs:
        raise MonquantError(
            f"--resume: {'; '.join(diffs)} differ from the interrupted run in {ckpt}; "
            "resume with the same settings (only --epochs may grow) or use a new --out"
        )


def run_training(
    req: TrainRequest,
    data: MNIST,
    echo: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Train (or resume) the run in ``req.out``; return paths and the per-epoch history.

    The run folder is locked for the duration (:func:`monquant.storage.files.folder_lock`): a
    second training into the same folder is refused instead of silently overwriting it.
    """
    if not dist.is_main():  # data-parallel: rank 0 holds the lock and writes; the others train
        return _run_training(req, data, None)
    with folder_lock(req.out, "training"):
        return _run_training(req, data, echo)


def _run_training(
    req: TrainRequest, data: MNIST, echo: Callable[[str], None] | None
) -> dict[str, Any]:
    out = Path(req.out)
    ckpt = out / "checkpoint.safetensors"
    cfg = req.train_config()
    resume_state = None
    if req.resume and ckpt.exists():
        loaded = load_model(ckpt)
        model, resume_state = loaded.model, loaded.train_state
        _check_resumable(ckpt, loaded.metadata.get("settings", {}), req, data, cfg)
        if resume_state is None:
            raise MonquantError(f"{ckpt} holds no training state to resume from")
        if echo:
            echo(f"resuming {ckpt} after epoch {resume_state['epoch']}")
    else:
        if req.resume and echo:
            echo(f"--resume: no checkpoint in {out}, starting from scratch")
        torch.manual_seed(req.train.seed)
        model = build_classifier(req.model_config(data.x_train.shape[1], 10))
    settings = _settings(req, model, data)
    started = time.perf_counter()

    def on_epoch(entry: dict[str, Any]) -> None:
        if echo:
            echo(
                f"epoch {entry['epoch']:2d}: loss {entry['loss']:.4f} "
                f"train {entry['train_accuracy']:.4f} test {entry['test_accuracy']:.4f} "
                f"m {entry['m']:.4f} kappa {entry['kappa']:.2f} it {entry['mean_iterations']:.1f}"
                f" unconverged {entry['train_unconverged']}/{entry['test_unconverged']} "
                f"{entry['seconds']:.1f}s"
            )

    def checkpoint(state: dict[str, Any]) -> None:
        if dist.is_main():  # one writer; the others wait so that no rank runs ahead of it
            save_model(ckpt, model, train_state=state, extra={"settings": settings})
            write_json(out / "log.json", {"settings": settings, "history": state["history"]})
        dist.barrier()

    history = train(
        model,
        data.x_train,
        data.y_train,
        data.x_test,
        data.y_test,
        cfg,
        checkpoint=checkpoint,
        resume_state=resume_state,
        progress=req.progress,
        log=on_epoch,
    )
    final = out / "model.safetensors"
    if dist.is_main():
        save_model(final, model, extra={"settings": settings, "history": history})
    dist.barrier()
    return {
        "model": str(final),
        "checkpoint": str(ckpt),
        "log": str(out / "log.json"),
        "history": history,
        "seconds": time.perf_counter() - started,
    }
