"""Model checkpoints: a MonDEQ (float or quantized) plus training state, in one safetensors file.

Layout (all tensors, no pickle; JSON metadata in the header, see :mod:`monquant.io`):

- ``model.<name>``: the model's ``state_dict`` (A, B, m_raw, U, b, head);
- ``optim.<param index>.<key>``: Adam moments and step counts (training checkpoints only);
- ``quant.<W|U|b>.codes`` / ``quant.<...>.step``: integer codes and steps of a quantized model;
  a multi-tier model's ``W`` is several composite kernels, stored as ``quant.W.<j>.*`` (the
  diagonal blocks' kernels, then the couplings').

Metadata: ``kind`` (``monquant-model``), ``format`` (integer, bumped on incompatible changes;
older formats stay loadable), ``config`` (:class:`~monquant.model.MonDEQConfig`), ``train``
settings, ``history``, ``epoch``, ``seed``, ``versions`` (monquant, torch), ``data`` checksums,
``quantization`` (bits, granularity, what was quantized, the certificate) when quantized.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monquant import __version__
from monquant.conv_model import ConvMonDEQClassifier, ConvMonDEQConfig
from monquant.errors import CheckpointError, ConfigError
from monquant.model import MonDEQClassifier, MonDEQConfig
from monquant.multitier_model import MultiTierMonDEQClassifier, MultiTierMonDEQConfig
from monquant.operators import OperatorError
from monquant.quant.uniform import (
    QuantizationError,
    Quantized,
    check_bits,
    check_granularity,
    check_step_rule,
    quantize,
)
from monquant.storage.jsonio import to_jsonable
from monquant.storage.tensors import is_monquant_file, load_tensors, save_tensors

__all__ = [
    "CHECKPOINT_FORMAT",
    "Classifier",
    "LoadedModel",
    "QuantizedWeights",
    "architecture",
    "build_classifier",
    "check_parts",
    "load_model",
    "quantize_model",
    "save_model",
]

CHECKPOINT_FORMAT = 1
KIND = "monquant-model"
#: the classifiers a checkpoint holds (``config.arch``: ``fc``, the default, ``conv`` or
#: ``multitier``)
Classifier = MonDEQClassifier | ConvMonDEQClassifier | MultiTierMonDEQClassifier
ModelConfig = MonDEQConfig | ConvMonDEQConfig | MultiTierMonDEQConfig
#: the config and classifier of each architecture a checkpoint can hold
ARCHITECTURES: dict[str, tuple[Any, Any]] = {
    "fc": (MonDEQConfig, MonDEQClassifier),
    "conv": (ConvMonDEQConfig, ConvMonDEQClassifier),
    "multitier": (MultiTierMonDEQConfig, MultiTierMonDEQClassifier),
}


@dataclass
class QuantizedWeights:
    """Quantized replacements for ``W`` (and optionally ``U``, ``b``) of a MonDEQ.

    ``tiers`` is set for a multi-tier model (``(number of tiers, image)``): its ``W`` is the parts
    ``W.0``, ``W.1``, ... (one per composite kernel), assembled into the
    :class:`~monquant.operators.multitier.MultiTierConvOperator` the layer runs on.
    """

    bits: int
    granularity: str
    parts: dict[str, Quantized] = field(default_factory=dict)
    step_rule: str = "paper"
    tiers: tuple[int, tuple[int, int]] | None = None

    def tensor(self, name: str) -> Any:
        """The dequantized part ``name`` (``W`` of a multi-tier model: its operator), or None."""
        if name == "W" and self.tiers is not None:
            from monquant.operators.multitier import MultiTierConvOperator

            T, image = self.tiers
            ks = [self.parts[f"W.{j}"].dequantized() for j in range(2 * T - 1) if f"W.{j}" in self.parts]
            return MultiTierConvOperator.from_kernels(ks, image) if ks else None  # shapes checked
        q = self.parts.get(name)
        return None if q is None else q.dequantized()

    def overrides(self) -> dict[str, Any]:
        """Keyword arguments for ``model(x, W=..., U=..., b=...)``."""
        return {k: self.tensor(k) for k in ("W", "U", "b")}


def architecture(model: Classifier) -> str:
    """The model's architecture name (a key of :data:`ARCHITECTURES`: ``fc``, ``conv``,
    ``multitier``)."""
    for name, (_, cls) in ARCHITECTURES.items():
        if isinstance(model, cls):
            return name
    raise ConfigError(f"not a monquant classifier: {type(model).__name__}")


def check_parts(model: Classifier, parts: tuple[str, ...]) -> None:
    """Refuse a PTQ of ``parts`` that ``model`` cannot take (:func:`quantize_model`; callers may
    check before loading any data)."""
    bad = set(parts) - {"W", "U", "b"}
    if bad or not parts:
        raise ConfigError(f"can quantize W, U and b only, got {sorted(set(parts))}")
    if architecture(model) == "multitier" and tuple(parts) != ("W",):
        raise ConfigError("a multi-tier model quantizes W (its composite kernels) only; "
                          f"got {','.join(parts)}")  # fmt: skip


def _tiers(model: Classifier) -> tuple[int, tuple[int, int]] | None:
    """``(tiers, image)`` of a multi-tier model, else None."""
    if isinstance(model, MultiTierMonDEQClassifier):
        return len(model.config.tier_channels), tuple(model.config.image)  # type: ignore[return-value]
    return None


def quantize_model(
    model: Classifier,
    bits: int,
    granularity: str = "per-tensor",
    parts=("W",),
    step_rule: str = "paper",
) -> QuantizedWeights:
    """Post-training quantization of ``W`` (default, as in the paper) and optionally ``U``, ``b``,
    with the quantizer's ``step_rule`` (``paper`` or ``narrow``; recorded in the file). For a
    convolutional model ``W`` is the composite kernel (per-channel: per output channel, dim 0)
    and ``U`` the injection's kernel."""
    check_parts(model, parts)
    layer = model.layer
    tiers = _tiers(model)
    if tiers is not None:  # the composite kernels, quantized exactly as certify_multitier does
        from monquant.certify_multitier import quantize_kernels

        qs = quantize_kernels(layer.reference_weight().composite(), bits, granularity, step_rule)
        out = QuantizedWeights(bits=bits, granularity=granularity, step_rule=step_rule, tiers=tiers)
        for j, q in enumerate(qs):
            out.parts[f"W.{j}"] = dataclasses.replace(q, dtype=layer.U.weight.dtype)
        return out
    src = {
        "W": layer.reference_weight().to(layer.U.weight.dtype),
        "U": layer.U.weight.detach(),
        "b": layer.U.bias.detach(),
    }
    out = QuantizedWeights(bits=bits, granularity=granularity, step_rule=step_rule)
    for name in parts:
        gran = "per-tensor" if name == "b" else granularity
        out.parts[name] = quantize(src[name], bits, gran, step_rule=step_rule)
    return out


@dataclass
class LoadedModel:
    """A model loaded from disk with its metadata, resumable training state and quantization."""

    model: Classifier
    metadata: dict[str, Any]
    train_state: dict[str, Any] | None
    quantized: QuantizedWeights | None


def _optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    for idx, st in state["state"].items():
        for key, val in st.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(val)
    return tensors, {"param_groups": state["param_groups"]}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def save_model(
    path: str | os.PathLike[str],
    model: Classifier,
    *,
    train_state: dict[str, Any] | None = None,
    quantized: QuantizedWeights | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and optionally optimizer/scheduler state, quantization) atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {
        "kind": KIND,
        "format": CHECKPOINT_FORMAT,
        "config": model.config.as_dict(),
        "versions": {"monquant": __version__, "torch": torch.__version__},
    }
    if train_state is not None:
        opt_t, opt_meta = _optimizer_tensors(train_state["optimizer"])
        tensors.update(opt_t)
        meta["train_state"] = {
            "epoch": train_state["epoch"],
            "optimizer": opt_meta,
            "scheduler": train_state["scheduler"],
            "history": train_state["history"],
        }
    if quantized is not None:
        for name, q in quantized.parts.items():
            tensors[f"quant.{name}.codes"] = q.codes
            tensors[f"quant.{name}.step"] = q.step
            tensors[f"quant.{name}.w_max"] = q.w_max
        meta["quantization"] = {
            "bits": quantized.bits,
            "granularity": quantized.granularity,
            "step_rule": quantized.step_rule,
            "parts": sorted(quantized.parts),
            "granularities": {k: q.granularity for k, q in quantized.parts.items()},
        }
    if extra:
        meta.update(extra)
    # non-finite numbers (an uncertified bound is inf, a diverged loss nan) become strings
    return save_tensors(path, tensors, to_jsonable(meta))


def build_classifier(config: ModelConfig) -> Classifier:
    """The classifier of a config: dense (:class:`MonDEQClassifier`), convolutional
    (:class:`ConvMonDEQClassifier`) or multi-tier (:class:`MultiTierMonDEQClassifier`)."""
    for kind, cls in ARCHITECTURES.values():
        if isinstance(config, kind):
            return cls(config)
    raise ConfigError(f"not a model config: {type(config).__name__}")


def _config(meta: dict[str, Any]) -> ModelConfig:
    raw = dict(meta.get("config") or {})
    arch = raw.get("arch", "fc")  # files before the conv model hold a dense config without arch
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"checkpoint holds a model of unknown architecture {arch!r}")
    kind: Any = ARCHITECTURES[arch][0]
    if arch == "fc":
        raw.pop("arch", None)
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(raw) - names
    if unknown:  # written by a newer version: keep what we understand, say so
        warnings.warn(
            f"checkpoint config has settings this monquant does not know (ignored): "
            f"{sorted(unknown)}",
            stacklevel=3,
        )
        raw = {k: v for k, v in raw.items() if k in names}
    try:
        return kind(**raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint has an invalid model config: {exc}") from exc


def _quantized_parts(
    path: str | os.PathLike[str], qm: Any, tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> QuantizedWeights:
    """The quantized parts recorded in a checkpoint, checked: every key, bit-width and code range.

    A file whose metadata or tensors do not describe a valid quantization is refused with a
    :class:`CheckpointError` naming what is wrong (never a KeyError deep inside).
    """
    try:
        bits = check_bits(qm["bits"])
        rule = check_step_rule(qm.get("step_rule", "paper"))  # files before the rule: paper
        quantized = QuantizedWeights(bits=bits, granularity=str(qm["granularity"]), step_rule=rule)
        for name in qm["parts"]:
            keys = [f"quant.{name}.{k}" for k in ("codes", "step", "w_max")]
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise CheckpointError(f"{path}: quantized part {name!r} lacks {', '.join(missing)}")
            codes = tensors[keys[0]]
            qmax = 2 ** (bits - 1) - 1
            if codes.is_floating_point() or bool((codes.to(torch.int64).abs() > qmax).any()):
                raise CheckpointError(
                    f"{path}: {keys[0]} holds codes outside the symmetric {bits}-bit range "
                    f"[-{qmax}, {qmax}]"
                )
            quantized.parts[name] = Quantized(
                codes=codes,
                step=tensors[keys[1]],
                w_max=tensors[keys[2]],
                bits=bits,
                granularity=check_granularity(qm["granularities"][name]),
                dtype=dtype,
                step_rule=rule,
            )
    except (KeyError, TypeError, QuantizationError) as exc:
        raise CheckpointError(f"{path}: invalid quantization metadata: {exc}") from None
    return quantized


def load_model(path: str | os.PathLike[str], device: str | torch.device | None = None) -> LoadedModel:
    """Load a checkpoint written by :func:`save_model` (never unpickles; verifies the digest)
    onto ``device`` (default: torch's default device, ``cpu`` unless ``--device`` changed it)."""
    if device is None:
        device = torch.get_default_device()
    if Path(path).suffix == ".safetensors" and not is_monquant_file(path):
        raise CheckpointError(
            f"{path}: a plain safetensors file, not a monquant model checkpoint; weight files "
            "holding W (and U, b) are accepted by `monquant certify`"
        )
    tensors, meta = load_tensors(path, device=device)
    if meta.get("kind") != KIND:
        raise CheckpointError(
            f"{path}: not a monquant model checkpoint (kind={meta.get('kind')!r}); "
            "plain weight files (W, U, b) are accepted by `monquant certify`"
        )
    fmt = int(meta.get("format", 0))
    if fmt > CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {fmt} is newer than this monquant supports "
            f"({CHECKPOINT_FORMAT}); upgrade monquant"
        )
    model = build_classifier(_config(meta)).to(device)
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: tensors do not match the stored config: {exc}") from exc
    train_state = None
    ts = meta.get("train_state")
    if ts is not None:
        train_state = {
            "epoch": ts["epoch"],
            "optimizer": _optimizer_state(tensors, ts["optimizer"]),
            "scheduler": ts["scheduler"],
            "history": ts["history"],
        }
    quantized = None
    qm = meta.get("quantization")
    if qm is not None:
        quantized = _quantized_parts(path, qm, tensors, model.layer.U.weight.dtype)
        quantized.tiers = _tiers(model)
        if quantized.tiers is not None:  # the stored kernels must make an operator on its tiers
            try:
                model.layer.operator_of(quantized.tensor("W"))
            except OperatorError as exc:
                raise CheckpointError(f"{path}: its quantized kernels do not fit the model: {exc}") from None
    return LoadedModel(model=model, metadata=meta, train_state=train_state, quantized=quantized)
