"""The model-level API: quantize, train quantization-aware and certify *any* model that contains
MonDEQ layers, in place, in the conventions of PyTorch's quantization libraries.

- :func:`quantize_` (post-training quantization, in place, like ``torchao.quantize_``);
- :func:`prepare_qat` / :func:`convert` (training-time quantization: STE, margin-aware,
  ProxQuant on ``W`` or on the factors), with :func:`qat_penalty` (add it to the loss) and
  :func:`qat_step` (call it after ``optimizer.step()``);
- :func:`certify_model` -> :class:`ModelCertificate` (one certificate per MonDEQ layer, the
  quantized operator against its float one, proved in floating point) and
  :func:`min_certified_bits`.

A layer is found wherever it sits in the model: :class:`monquant.nn.MonDEQ` layers are used as
they are; a :class:`monquant.model.MonDEQLayer` (e.g. inside a ``MonDEQClassifier`` loaded from a
``monquant train`` checkpoint) is replaced in place by an equivalent ``MonDEQ`` (same parameters),
because only ``MonDEQ`` saves its quantization state. ``filter_fn(module, name)`` restricts the
layers touched, as in torchao.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from monquant.certify import Certificate, certify, certify_operator
from monquant.certify import min_certified_bits as _min_bits
from monquant.errors import ConfigError
from monquant.model import MonDEQLayer
from monquant.nn import (
    QAT_METHODS,
    ConvMonDEQ,
    LayerQuant,
    MonDEQ,
    MultiTierMonDEQ,
    QuantConv2d,
    QuantLinear,
)
from monquant.qconfig import QuantConfig
from monquant.quant.uniform import quantize

__all__ = [
    "ModelCertificate",
    "certify_model",
    "convert",
    "min_certified_bits",
    "mondeq_layers",
    "prepare_qat",
    "qat_penalty",
    "qat_step",
    "quantize_",
]

FilterFn = Callable[[nn.Module, str], bool]


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def mondeq_layers(model: nn.Module, filter_fn: FilterFn | None = None,
                  upgrade: bool = True) -> Iterator[tuple[str, MonDEQLayer]]:  # fmt: skip
    """``(name, layer)`` for every MonDEQ layer of ``model`` (``model`` itself included, name
    ``""``) that ``filter_fn`` accepts; with ``upgrade``, plain ``MonDEQLayer``\\ s are first
    replaced in place by :class:`~monquant.nn.MonDEQ` (same parameters)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, MonDEQLayer)]
    for name, layer in found:
        if filter_fn is not None and not filter_fn(layer, name):
            continue
        if upgrade and not isinstance(layer, MonDEQ):
            if name == "":
                raise ConfigError("pass a model containing the MonDEQLayer (or use monquant.nn.MonDEQ)")
            layer = MonDEQ.from_layer(layer)
            _set_child(model, name, layer)
        yield name, layer


def _conv_layers(model: nn.Module, filter_fn: FilterFn | None) -> list[tuple[str, ConvMonDEQ]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ConvMonDEQ)
            and (filter_fn is None or filter_fn(m, n))]  # fmt: skip


def _multitier_layers(model: nn.Module, filter_fn: FilterFn | None) -> list[tuple[str, MultiTierMonDEQ]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MultiTierMonDEQ)
            and (filter_fn is None or filter_fn(m, n))]  # fmt: skip


def _require_W_only(config: QuantConfig, layer: str, what: str) -> None:
    """Convolutional MonDEQ layers quantize ``W`` (as composite kernels) and nothing else."""
    if config.mondeq_targets != ("W",):
        raise ConfigError(f"{layer} layers quantize W ({what}) only: use targets=('W',) (and "
                          "'Linear'/'Conv2d' for ordinary layers)")  # fmt: skip


@torch.no_grad()
def _multitier_ptq(layer: MultiTierMonDEQ, config: QuantConfig) -> Any:
    """``W~`` of PTQ with ``config``: every composite kernel quantized on its own grid, stored in
    the layer's dtype and on its device."""
    from monquant.certify_multitier import quantize_multitier

    _require_W_only(config, "MultiTierMonDEQ", "their composite kernels")
    tilde, _ = quantize_multitier(layer.operator().composite(), config.bits, config.granularity,
                                  config.step_rule)  # fmt: skip
    return tilde.to(dtype=layer.B[0].dtype, device=layer.B[0].device)


def _deploy_multitier(layer: MultiTierMonDEQ, config: QuantConfig, tilde: Any, method: str = "ptq",
                      margin_target: float | None = None) -> None:  # fmt: skip
    """The layer runs on ``tilde``'s composite kernels from now on (saved as ``diag<i>``,
    ``down<i>``), labelled with how they were made."""
    tensors = {f"diag{i}": K for i, K in enumerate(tilde.diag)}
    tensors.update({f"down{i}": R for i, R in enumerate(tilde.down)})
    layer.quant = LayerQuant(config, "quantized", method, margin_target, tensors)


def _quantize_multitier(layer: MultiTierMonDEQ, config: QuantConfig) -> None:
    _deploy_multitier(layer, config, _multitier_ptq(layer, config))


def _multitier_certificate(layer: MultiTierMonDEQ, config: QuantConfig | None) -> tuple[Certificate, Any]:
    import dataclasses

    from monquant.certify_multitier import certify_deployed, certify_multitier

    q = layer.quant
    if q is not None and q.mode == "quantized" and config is None:
        qc = q.config  # the deployed W~ itself is certified (labelled with how it was made)
        cert = certify_multitier(layer.reference_weight(), tilde=layer.deployed_operator())
        cert = dataclasses.replace(cert, bits=qc.bits, granularity=qc.granularity, step_rule=qc.step_rule)
        return cert, {**qc.to_dict(), "method": q.method}
    qc = _config_to_certify(q, config)
    _require_W_only(qc, "MultiTierMonDEQ", "their composite kernels")
    cert, _ = certify_deployed(layer.reference_weight(), qc.bits, qc.granularity, qc.step_rule,
                               dtype=layer.B[0].dtype, device=layer.B[0].device)  # fmt: skip
    return cert, qc.to_dict()


@torch.no_grad()
def _conv_ptq(layer: ConvMonDEQ, config: QuantConfig) -> torch.Tensor:
    """``Q_b`` of the composite kernel in the layer's dtype: the ``K~`` PTQ deploys."""
    K = layer.operator().composite_kernel().to(layer.B.dtype)
    return quantize(K, config.bits, config.granularity, step_rule=config.step_rule).dequantized()


def _quantize_conv(layer: ConvMonDEQ, config: QuantConfig) -> None:
    """PTQ of the composite kernel, stored in the layer's dtype (as its forward pass uses it)."""
    _require_W_only(config, "ConvMonDEQ", "their composite kernel")
    layer.quant = LayerQuant(config, "quantized", "ptq", None, {"K": _conv_ptq(layer, config)})


def _conv_certificate(layer: ConvMonDEQ, config: QuantConfig | None) -> tuple[Certificate, Any]:
    import dataclasses

    from monquant.certify_conv import certify_conv

    K = layer.operator().composite_kernel()
    q = layer.quant
    if q is not None and q.mode == "quantized" and config is None:
        cert = certify_conv(K, layer.image, kernel_tilde=q.tensors["K"])
        cert = dataclasses.replace(cert, bits=q.config.bits, granularity=q.config.granularity,
                                   step_rule=q.config.step_rule)  # fmt: skip
        return cert, {**q.config.to_dict(), "method": q.method}
    c = _config_to_certify(q, config)
    cert = certify_conv(K, layer.image, kernel_tilde=_conv_ptq(layer, c))  # what quantize_ deploys
    cert = dataclasses.replace(cert, bits=c.bits, granularity=c.granularity, step_rule=c.step_rule)
    return cert, c.to_dict()


def _config_to_certify(q: LayerQuant | None, config: QuantConfig | None) -> QuantConfig:
    """The quantization ``certify_model`` certifies for a layer not yet deployed: the given
    ``config``, else the layer's own (QAT); a float layer without a config is an error."""
    c = config or (q.config if q is not None else None)
    if c is None:
        raise ConfigError("certify_model: a layer is not quantized; pass a QuantConfig to "
                          "certify its quantization")  # fmt: skip
    return c


def _check_found(names: list[str], what: str) -> None:
    if not names:
        raise ConfigError(f"{what}: the model has no MonDEQ layer (that filter_fn accepts)")


# ------------------------------------------------------------------------------------------ PTQ


@torch.no_grad()
def _hard_tensors(
    layer: MonDEQ, config: QuantConfig, source: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    out = {}
    for name in config.mondeq_targets:
        t = source[name].detach()
        out[name] = quantize(t, config.bits, config.granularity_of(name),
                             step_rule=config.step_rule).dequantized().to(t.dtype)  # fmt: skip
    return out


def _quantize_ordinary(model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None) -> list[str]:
    kinds: dict[str, tuple[type[nn.Module], Any]] = {
        "Linear": (nn.Linear, QuantLinear), "Conv2d": (nn.Conv2d, QuantConv2d)}  # fmt: skip
    inner = [n for n, _ in mondeq_layers(model, upgrade=False) if n]
    inner += [n for n, _ in _conv_layers(model, None) if n]
    done: list[str] = []
    for target in (t for t in config.targets if t in kinds):
        base, quant = kinds[target]
        for name, m in list(model.named_modules()):
            if type(m) is not base or name == "":
                continue
            if filter_fn is not None and not filter_fn(m, name):
                continue
            if any(name.startswith(n + ".") for n in inner):
                continue  # a MonDEQ layer's own injection is quantized through "U"
            _set_child(model, name, quant.from_float(m, config))  # type: ignore[attr-defined]
            done.append(name)
    return done


def quantize_(model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None) -> nn.Module:
    """Post-training quantization in place: every MonDEQ layer then runs on ``Q_b`` of the tensors
    in ``config.targets`` (its float parameters are kept: they are the reference its certificate
    compares with), and, if ``config.targets`` names ``Linear`` / ``Conv2d``, the model's ordinary
    layers of those types become :class:`~monquant.nn.QuantLinear` / ``QuantConv2d``. Layers in
    QAT are converted (:func:`convert`) instead. Returns ``model``."""
    names = []
    for name, layer in mondeq_layers(model, filter_fn):
        assert isinstance(layer, MonDEQ)
        if layer.quant is not None and layer.quant.mode == "qat":
            _convert_layer(layer)
        else:
            used = {"W": layer.weight(), "U": layer.U.weight, "b": layer.U.bias}
            layer.quant = LayerQuant(config, "quantized", "ptq", None,
                                     _hard_tensors(layer, config, used))  # fmt: skip
        names.append(name)
    for name, conv in _conv_layers(model, filter_fn):
        _quantize_conv(conv, config)
        names.append(name)
    for name, tiered in _multitier_layers(model, filter_fn):
        _quantize_multitier(tiered, config)
        names.append(name)
    names += _quantize_ordinary(model, config, filter_fn)
    _check_found(names, "quantize_")
    return model


# ------------------------------------------------------------------------------------------ QAT


def _to_free(layer: MonDEQ) -> None:
    """Make ``W`` itself the parameter (ProxQuant on ``W``), starting from the current ``W``."""
    from dataclasses import replace

    W = layer.weight().detach().clone()
    for name in ("A", "B", "m_raw"):
        if name in layer._parameters:
            del layer._parameters[name]
        if name in layer._buffers:
            del layer._buffers[name]
    layer.config = replace(layer.config, parameterization="free")
    layer.W = nn.Parameter(W)


def prepare_qat(
    model: nn.Module,
    config: QuantConfig,
    method: str = "ste",
    filter_fn: FilterFn | None = None,
    margin_target: float = 0.1,
    total_steps: int = 1000,
    lam_max: float = 5.0,
) -> nn.Module:
    """Prepare every MonDEQ layer for quantization-aware training with ``method``, in place:

    - ``ste``: the forward pass uses ``Q_b`` of ``config.targets`` with straight-through gradients;
    - ``margin-aware``: STE, plus :func:`qat_penalty` ``relu(tau - margin(Q_b(W)))`` to add to the
      loss (``tau = margin_target``);
    - ``proxquant-W`` / ``proxquant-factors``: ProxQuant (Bai, Wang and Liberty) on ``W`` itself
      (the layer's ``W`` becomes a free parameter: build the optimizer *after* this call) or on
      the factors ``A``, ``B``; call :func:`qat_step` after every optimizer step (the prox
      strength grows linearly to ``lam_max`` over ``total_steps``).

    A :class:`~monquant.nn.ConvMonDEQ` layer trains on its composite kernel ``K`` the same way
    (``Q_b(K)`` per tensor or per output channel with straight-through gradients; the
    margin-aware penalty through the exact margin of ``Q_b(K)`` from its Fourier blocks) or, with
    ``proxquant-factors``, on its factor kernels ``A``, ``B`` (``proxquant-W`` needs a free ``W``,
    which it has not); it quantizes ``W`` only (``targets=('W',)``). A
    :class:`~monquant.nn.MultiTierMonDEQ` layer trains with ``ste`` (every composite kernel
    fake-quantized on its own grid) or ``proxquant-factors`` (every factor kernel); margin-aware
    QAT is refused for it (no closed-form margin of the quantized operator).

    Then :func:`convert` hard-quantizes. Returns ``model``.
    """
    if method not in QAT_METHODS:
        raise ConfigError(f"method must be one of {QAT_METHODS}, got {method!r}")
    if method.startswith("proxquant") and config.mondeq_targets != ("W",):
        raise ConfigError(f"{method} quantizes W (or its factors) only: use targets=('W',)")
    convs: list[tuple[str, ConvMonDEQ | MultiTierMonDEQ]] = [*_conv_layers(model, filter_fn)]
    tiers = _multitier_layers(model, filter_fn)
    if convs:
        _require_W_only(config, "ConvMonDEQ", "their composite kernel")
    if tiers:
        _require_W_only(config, "MultiTierMonDEQ", "their composite kernels")
        if method == "margin-aware":
            raise ConfigError("margin-aware QAT needs the exact margin of the quantized operator, "
                              "which a MultiTierMonDEQ layer does not have in closed form (its "
                              "certificate is the Weyl tier): use ste or proxquant-factors")  # fmt: skip
    if (convs or tiers) and method == "proxquant-W":
        raise ConfigError("proxquant-W needs a free W, which convolutional MonDEQ layers do not have: "
                          "use proxquant-factors (their factor kernels)")  # fmt: skip
    names = [name for name, _ in (*convs, *tiers)]
    for _, conv in (*convs, *tiers):
        q = LayerQuant(config, "qat", method, margin_target if method == "margin-aware" else None)
        if method == "proxquant-factors":
            conv.install_prox(q, total_steps, lam_max)
        conv.quant = q
    for name, layer in mondeq_layers(model, filter_fn):
        assert isinstance(layer, MonDEQ)
        if method == "proxquant-W" and not layer.free:
            _to_free(layer)
        if method == "proxquant-factors" and layer.free:
            raise ConfigError(f"layer {name!r} has a free W: it has no factors A, B")
        q = LayerQuant(config, "qat", method, margin_target if method == "margin-aware" else None)
        if method.startswith("proxquant"):
            layer.install_prox(q, total_steps, lam_max)
        layer.quant = q
        names.append(name)
    _check_found(names, "prepare_qat")
    return model


def qat_penalty(model: nn.Module) -> torch.Tensor:
    """The sum of every layer's margin-aware penalty (add it to the loss; 0 for other methods)."""
    terms = [m.qat_penalty() for m in model.modules() if isinstance(m, MonDEQ | ConvMonDEQ)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


@torch.no_grad()
def qat_step(model: nn.Module, step: int, lr: float = 1.0) -> None:
    """After ``optimizer.step()`` number ``step``: the ProxQuant prox step ``w <- prox_{lr
    lam_t R}(w)`` of every ProxQuant layer (pass the optimizer's learning rate)."""
    for m in model.modules():
        if isinstance(m, MonDEQ | ConvMonDEQ | MultiTierMonDEQ) and m.quant is not None \
                and m.quant.prox is not None:  # fmt: skip
            m.quant.prox.after_step(step, lr)


@torch.no_grad()
def _convert_layer(layer: MonDEQ) -> None:
    from monquant.operators import wk_weight

    q = layer.quant
    assert q is not None
    if q.method in ("ste", "margin-aware"):
        used = {"W": layer.weight(), "U": layer.U.weight, "b": layer.U.bias}
        tensors = _hard_tensors(layer, q.config, used)
    elif q.method == "proxquant-W":
        q.prox.freeze()
        tensors = {"W": layer.W.detach().clone()}
    else:  # factors on their grids; W~ assembled from them (monotone by construction)
        q.prox.freeze()
        tensors = {"W": wk_weight(layer.A, layer.B, layer.margin()).detach().clone()}
    layer.quant = LayerQuant(q.config, "quantized", q.method, q.margin_target, tensors)


@torch.no_grad()
def _convert_conv(layer: ConvMonDEQ) -> None:
    """The composite kernel a convolutional layer deploys after QAT: ``Q_b(K)`` of the trained
    kernel (STE, margin-aware; as :func:`quantize_` would), or the kernel assembled from the factor
    kernels frozen on their grids (ProxQuant on the factors: monotone by construction)."""
    q = layer.quant
    assert q is not None
    if q.method == "proxquant-factors":
        q.prox.freeze()
        Kq = layer.operator().composite_kernel().to(layer.B.dtype)
    else:
        Kq = _conv_ptq(layer, q.config)
    layer.quant = LayerQuant(q.config, "quantized", q.method, q.margin_target, {"K": Kq})


@torch.no_grad()
def _convert_multitier(layer: MultiTierMonDEQ) -> None:
    """The composite kernels a multi-tier layer deploys after QAT: those of PTQ of the trained
    weights (STE), or those assembled from the factor kernels frozen on their grids (ProxQuant on
    the factors: monotone by construction)."""
    q = layer.quant
    assert q is not None
    if q.method == "proxquant-factors":
        q.prox.freeze()
        tilde = layer.operator().composite().to(dtype=layer.B[0].dtype, device=layer.B[0].device)
    else:
        tilde = _multitier_ptq(layer, q.config)
    _deploy_multitier(layer, q.config, tilde, q.method, q.margin_target)


def convert(model: nn.Module, filter_fn: FilterFn | None = None) -> nn.Module:
    """End training-time quantization in place: every layer in QAT now runs on its hard-quantized
    tensors (STE/margin-aware: ``Q_b`` of the trained weights; ProxQuant: the weights frozen on
    their grids). Returns ``model``."""
    names = []
    for name, layer in mondeq_layers(model, filter_fn, upgrade=False):
        if isinstance(layer, MonDEQ) and layer.quant is not None and layer.quant.mode == "qat":
            _convert_layer(layer)
            names.append(name)
    for name, conv in _conv_layers(model, filter_fn):
        if conv.quant is not None and conv.quant.mode == "qat":
            _convert_conv(conv)
            names.append(name)
    for name, tier in _multitier_layers(model, filter_fn):
        if tier.quant is not None and tier.quant.mode == "qat":
            _convert_multitier(tier)
            names.append(name)
    if not names:
        raise ConfigError("convert: no MonDEQ layer is in quantization-aware training "
                          "(call prepare_qat first)")  # fmt: skip
    return model


# ------------------------------------------------------------------------------------ certify


@dataclass
class ModelCertificate:
    """One :class:`~monquant.certify.Certificate` per MonDEQ layer and the model's verdict:
    ``certified`` when every layer is, ``refuted`` when any layer is proved non-monotone, else
    ``undecided`` (never reported as certified)."""

    layers: dict[str, Certificate]
    configs: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        v = [c.verdict for c in self.layers.values()]
        if all(x == "certified" for x in v):
            return "certified"
        return "refuted" if "refuted" in v else "undecided"

    @property
    def certified(self) -> bool:
        return self.verdict == "certified"

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict,
                "layers": {n: {"quantization": self.configs.get(n), **c.to_dict()}
                           for n, c in self.layers.items()}}  # fmt: skip

    def to_json(self) -> str:
        from monquant.storage.jsonio import dumps_json

        return dumps_json(self.to_dict())

    def __repr__(self) -> str:
        from monquant.report import text_table

        rows = [[n or "(model)", c.bits, c.granularity, c.dW_norm_upper, c.margin,
                 c.margin_quantized_lower, c.tier, c.verdict] for n, c in self.layers.items()]  # fmt: skip
        h = ["layer", "bits", "granularity", "||dW|| <=", "m", "margin(W~) >=", "tier", "verdict"]
        return f"ModelCertificate: {self.verdict}\n{text_table(h, rows)}"


def _layer_certificate(layer: MonDEQLayer, config: QuantConfig | None) -> tuple[Certificate, Any]:
    W = layer.weight().detach()
    q = layer.quant if isinstance(layer, MonDEQ) else None
    if q is not None and q.mode == "quantized" and config is None:
        qc = q.config  # the deployed W~ itself is certified (labelled with how it was made)
        cert = certify_operator(W, q.tensors.get("W", W), bits=qc.bits,
                                granularity=qc.granularity, step_rule=qc.step_rule)  # fmt: skip
        return cert, {**q.config.to_dict(), "method": q.method}
    c = _config_to_certify(q, config)
    return certify(W, c.bits, c.granularity, step_rule=c.step_rule), c.to_dict()


def certify_model(model: nn.Module, config: QuantConfig | None = None,
                  filter_fn: FilterFn | None = None) -> ModelCertificate:  # fmt: skip
    """Certify every MonDEQ layer without running a solver: a quantized layer's deployed ``W~``
    against its float ``W``; with ``config``, ``Q_b(W)`` of each layer's float ``W`` (what
    :func:`quantize_` with that config would deploy). Proved in floating point
    (:mod:`monquant.verified`); the model does not change."""
    layers, configs = {}, {}
    for name, layer in mondeq_layers(model, filter_fn, upgrade=False):
        layers[name], configs[name] = _layer_certificate(layer, config)
    for name, conv in _conv_layers(model, filter_fn):
        layers[name], configs[name] = _conv_certificate(conv, config)
    for name, tiered in _multitier_layers(model, filter_fn):
        layers[name], configs[name] = _multitier_certificate(tiered, config)
    if not layers:
        raise ConfigError("certify_model: the model has no MonDEQ layer (that filter_fn accepts)")
    return ModelCertificate(layers, configs)


def min_certified_bits(model: nn.Module, granularity: str = "per-tensor", step_rule: str = "paper",
                       filter_fn: FilterFn | None = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per MonDEQ layer, the smallest bit-width each certificate tier proves
    (:func:`monquant.certify.min_certified_bits` of its float ``W``)."""
    out = {name: _min_bits(layer.weight().detach(), granularity, step_rule=step_rule)
           for name, layer in mondeq_layers(model, filter_fn, upgrade=False)}  # fmt: skip
    if not out:
        raise ConfigError("min_certified_bits: the model has no MonDEQ layer")
    return out
