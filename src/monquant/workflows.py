"""Everyday workflows shared by the CLI and the experiments: post-training quantization and
evaluation of a saved model (training runs are :mod:`monquant.training.runs`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from monquant.certify import Certificate, certify
from monquant.certify_conv import certify_conv
from monquant.conv_model import ConvMonDEQClassifier
from monquant.data import MNIST, subset
from monquant.errors import ConfigError
from monquant.multitier_model import MultiTierMonDEQClassifier
from monquant.storage.checkpoints import (
    Classifier,
    LoadedModel,
    architecture,
    load_model,
    quantize_model,
    save_model,
)
from monquant.training.loop import evaluate

__all__ = ["certify_weights", "run_eval", "run_ptq"]


def _test_set(data: MNIST, test_limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images, or the first ``test_limit`` of them (``>= 1``)."""
    if test_limit is not None and test_limit < 1:
        raise ConfigError(f"test_limit must be >= 1, got {test_limit}")
    return subset(data.x_test, data.y_test, test_limit)


def certify_weights(model: Classifier, W: Any, W_tilde: Any) -> Certificate:
    """The certificate of running ``model`` on ``W_tilde`` instead of its float ``W``: the dense
    certificate (:func:`monquant.certify.certify`); for a convolutional model, the Fourier-block
    one of its composite kernel (:func:`monquant.certify_conv.certify_conv`); for a multi-tier
    model, the Weyl tier with a proved ``||dW||`` of its composite kernels
    (:func:`monquant.certify_multitier.certify_multitier`; ``W`` its float operator)."""
    if isinstance(model, MultiTierMonDEQClassifier):
        from monquant.certify_multitier import certify_multitier

        return certify_multitier(W, tilde=W_tilde)
    if isinstance(model, ConvMonDEQClassifier):
        return certify_conv(W, model.config.image, kernel_tilde=W_tilde)
    return certify(W, W_tilde=W_tilde)


def _ptq_name(bits: int, granularity: str, parts: tuple[str, ...]) -> str:
    """``ptq-<b>bit-<granularity>[-<parts>].safetensors``: W alone keeps the short name, so that
    quantizing W,U,b and W alone at the same bits never write the same file."""
    tag = "" if tuple(parts) == ("W",) else "-" + "".join(parts)
    return f"ptq-{bits}bit-{granularity}{tag}.safetensors"


def run_ptq(
    checkpoint: str | Path,
    data: MNIST,
    bits: int,
    granularity: str = "per-tensor",
    parts: tuple[str, ...] = ("W",),
    out: str | Path | None = None,
    test_limit: int | None = None,
    progress: bool = False,
    step_rule: str = "paper",
    loaded: LoadedModel | None = None,
) -> dict[str, Any]:
    """Quantize a float checkpoint, certify it, evaluate float and quantized, save the result.

    ``progress`` shows bars on stderr for the two evaluations; ``loaded`` is the checkpoint
    already read (it is read here otherwise)."""
    loaded = loaded if loaded is not None else load_model(checkpoint)
    model = loaded.model.eval()
    qw = quantize_model(model, bits, granularity, parts, step_rule)
    W = model.layer.reference_weight()
    Wt = qw.tensor("W")
    cert_d = certify_weights(model, W, W if Wt is None else Wt).to_dict()
    cert_d.update(bits=bits, granularity=granularity, step_rule=step_rule)
    x, y = _test_set(data, test_limit)
    float_eval = evaluate(model, x, y, progress=progress, desc="float model")
    q_eval = evaluate(model, x, y, **qw.overrides(), progress=progress, desc=f"{bits}-bit model")
    dest = (
        Path(out) if out else Path(checkpoint).with_name(_ptq_name(bits, granularity, parts))
    )
    save_model(
        dest,
        model,
        quantized=qw,
        extra={"certificate": cert_d, "source": str(checkpoint)},
    )
    return {
        "architecture": architecture(model),
        "bits": bits,
        "granularity": granularity,
        "step_rule": step_rule,
        "quantized": list(parts),
        "certificate": cert_d,
        "eval": q_eval.as_dict(),
        "float_eval": float_eval.as_dict(),
        "out": str(dest),
    }


def run_eval(
    checkpoint: str | Path,
    data: MNIST,
    test_limit: int | None = None,
    progress: bool = False,
    loaded: LoadedModel | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint (with its quantized weights, if it has them); ``progress``: a bar;
    ``loaded``: the checkpoint already read."""
    loaded = loaded if loaded is not None else load_model(checkpoint)
    model = loaded.model.eval()
    overrides = loaded.quantized.overrides() if loaded.quantized else {}
    W = overrides.get("W")
    W = W if W is not None else model.layer.reference_weight()
    st = model.layer.operator_of(W).spectral_stats()
    x, y = _test_set(data, test_limit)
    ev = evaluate(model, x, y, **overrides, progress=progress)
    return {
        "checkpoint": str(checkpoint),
        "quantized": loaded.quantized is not None,
        **dataclasses.asdict(st),
        "kappa": st.kappa,
        "eval": ev.as_dict(),
    }
