"""Drop-in ``nn.Module``s: the MonDEQ equilibrium layer and quantized ordinary layers.

``MonDEQ(in_features, hidden)`` maps a batch ``x`` of shape ``(batch, in_features)`` to the
equilibrium ``z* = relu(W z* + U x + b)`` of shape ``(batch, hidden)``, with
``W = (1 - m) I - A^T A + B - B^T`` (Winston-Kolter: monotone with margin ``>= m`` by construction)
and the splitting solver and implicit backward of :mod:`monquant.implicit`. Use it inside any
model (a convolutional stem before it, a linear head after it).

Everything that defines the layer is saved with it: the architecture and solver settings and the
quantization state (:class:`LayerQuant`: the :class:`~monquant.qconfig.QuantConfig`, the mode,
and the quantized tensors ``W~``, ``U~``, ``b~`` once converted) travel in the module's extra
state, so ``model.load_state_dict(torch.load(path, weights_only=True))`` into a freshly built model
restores a quantized model exactly. ``repr`` shows the margin parameterization, the solver and the
quantization.

The model-level functions (``quantize_``, ``prepare_qat``, ``convert``, ``certify_model``) are in
:mod:`monquant.api`; they install and read :class:`LayerQuant`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from monquant.conv_model import ConvMonDEQConfig, ConvMonDEQLayer
from monquant.errors import CheckpointError, ConfigError
from monquant.implicit import EquilibriumSolver
from monquant.model import MonDEQConfig, MonDEQLayer
from monquant.multitier_model import MultiTierMonDEQConfig, MultiTierMonDEQLayer, fake_quant_tiers
from monquant.operators import margin_tensor
from monquant.qconfig import QuantConfig
from monquant.quant.uniform import fake_quant, quantize
from monquant.solvers import SolverConfig

__all__ = [
    "QAT_METHODS",
    "ConvMonDEQ",
    "LayerQuant",
    "MonDEQ",
    "MultiTierMonDEQ",
    "QuantConv2d",
    "QuantLinear",
]

#: Training-time quantization methods of :func:`monquant.api.prepare_qat`.
QAT_METHODS: tuple[str, ...] = ("ste", "margin-aware", "proxquant-W", "proxquant-factors")
EXTRA_STATE_FORMAT = 1
#: architecture fields that a loaded state must match (the rest, e.g. the solver, is restored)
_ARCHITECTURE = ("in_features", "hidden", "rank", "parameterization")


def _prox_driver(
    config: QuantConfig, params: Sequence[torch.Tensor], total_steps: int, lam_max: float
) -> Any:
    """ProxQuant's driver (Bai, Wang and Liberty) for ``params``: each toward its own
    ``config.bits``-bit uniform grid (per output channel with ``per-channel``), the prox strength
    ``lam_t`` linear from 0 to ``lam_max`` over ``total_steps``."""
    from monquant.quant.prox import Grid, ProxQuantizer, lambda_schedule

    grid = Grid("uniform", config.bits, config.granularity)  # type: ignore[arg-type]
    sched = lambda_schedule("linear", lam_max=lam_max, total_steps=max(1, total_steps))
    return ProxQuantizer([(p, grid) for p in params], sched)


@dataclass
class LayerQuant:
    """The quantization state of one :class:`MonDEQ` layer.

    ``mode``: ``"qat"`` (training: STE fake quantization, or ProxQuant moving the weights toward
    the grid) or ``"quantized"`` (the forward pass uses ``tensors``: the deployed ``W~`` and, per
    ``config.targets``, ``U~``, ``b~``). ``method``: ``"ptq"`` or one of :data:`QAT_METHODS`.
    ``margin_target``: the margin-aware penalty's ``tau``. ``prox`` is the running ProxQuant driver
    (not saved: a loaded model in ProxQuant QAT recalibrates its grids).
    """

    config: QuantConfig
    mode: str
    method: str = "ptq"
    margin_target: float | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    prox: Any = None

    def state(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "mode": self.mode, "method": self.method,
                "margin_target": self.margin_target, "tensors": dict(self.tensors)}  # fmt: skip

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> LayerQuant:
        try:
            return cls(QuantConfig.from_dict(d["config"]), d["mode"], d["method"],
                       d.get("margin_target"), dict(d["tensors"]))  # fmt: skip
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"malformed MonDEQ quantization state ({exc})") from None

    def describe(self) -> str:
        c = self.config
        what = "+".join(c.mondeq_targets) or "-"
        return f"{what} {c.bits}-bit {c.granularity} ({self.method}, {self.mode})"

    def fake(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``Q_b(t)`` of target ``name`` (its granularity, the config's step rule) with
        straight-through gradients: what STE and margin-aware QAT run on."""
        c = self.config
        return fake_quant(t, c.bits, c.granularity_of(name), step_rule=c.step_rule)


def _restored(layer: Any, state: dict[str, Any] | None, device: torch.device) -> LayerQuant | None:
    """A layer's saved quantization state, its tensors on ``device`` and, in ProxQuant QAT, its
    driver rebuilt by ``layer.install_prox`` (recalibrated, never unpickled)."""
    if state is None:
        return None
    q = LayerQuant.from_state(state)
    q.tensors = {k: v.to(device) for k, v in q.tensors.items()}
    if q.mode == "qat" and q.method.startswith("proxquant"):
        layer.install_prox(q)
    return q


class MonDEQ(MonDEQLayer):
    """The equilibrium layer ``x -> z*`` (see the module docstring).

    ``margin``: the initial monotonicity margin ``m`` (learned through ``m = softplus(m_raw) +
    margin_floor`` unless ``learn_margin=False``); ``rank``: rank of ``A`` (default full);
    ``init``: ``uniform`` or ``paper``; ``solver``: a registered splitting method (``fb``, ``pr``,
    ``dr``, or one added by :func:`monquant.solvers.register_solver`) with ``tol``, ``max_iter``,
    ``step`` and ``anderson`` (safeguarded Anderson memory, 0 = off); ``backward``: ``splitting``
    (Theorem 5's adjoint solve) or ``direct``.
    """

    def __init__(
        self,
        in_features: int,
        hidden: int,
        *,
        rank: int | None = None,
        margin: float = 1.0,
        learn_margin: bool = True,
        margin_floor: float = 0.0,
        init: str = "uniform",
        solver: str = "pr",
        tol: float = 1e-4,
        max_iter: int = 2000,
        step: float | None = None,
        anderson: int = 0,
        backward: str = "splitting",
        parameterization: str = "wk",
    ) -> None:
        cfg = MonDEQConfig(
            in_features=in_features, hidden=hidden, out_features=1, rank=rank,
            margin_init=margin, learn_margin=learn_margin, margin_floor=margin_floor, init=init,
            solver=SolverConfig(method=solver, tol=tol, max_iter=max_iter, step=step,
                                anderson=anderson).as_dict(),
            backward=backward, parameterization=parameterization,
        )  # fmt: skip
        super().__init__(cfg)
        self.quant: LayerQuant | None = None

    @classmethod
    def from_config(cls, config: MonDEQConfig) -> MonDEQ:
        s = config.solver_config()
        return cls(config.in_features, config.hidden, rank=config.rank,
                   margin=config.margin_init, learn_margin=config.learn_margin,
                   margin_floor=config.margin_floor, init=config.init, solver=s.method,
                   tol=s.tol, max_iter=s.max_iter, step=s.step, backward=config.backward,
                   parameterization=config.parameterization).configure_solver(**s.as_dict())  # fmt: skip

    @classmethod
    def from_layer(cls, layer: MonDEQLayer) -> MonDEQ:
        """A :class:`MonDEQ` with ``layer``'s configuration and a copy of its parameters (e.g. the
        ``layer`` of a :class:`monquant.model.MonDEQClassifier` loaded from a checkpoint)."""
        out = cls.from_config(layer.config)
        p = next(layer.parameters())
        out.to(device=p.device, dtype=p.dtype)
        out.load_state_dict({**layer.state_dict(), "_extra_state": out.get_extra_state()})
        return out

    # ------------------------------------------------------------------------------ the solver
    @property
    def solver_config(self) -> SolverConfig:
        """The forward solver's settings (method, tolerance, cap, step)."""
        return self.solver.forward_config

    def configure_solver(self, **settings: Any) -> MonDEQ:
        """Change solver settings (``method``, ``tol``, ``max_iter``, ``step``, ...; and
        ``backward``); they are saved with the layer. Returns ``self``."""
        backward = settings.pop("backward", self.config.backward)
        cfg = replace(self.solver.forward_config, **settings)
        self.config = replace(self.config, solver=cfg.as_dict(), backward=backward)
        self.solver = EquilibriumSolver(forward_config=self.config.solver_config(),
                                        backward=backward,  # type: ignore[arg-type]
                                        backward_tol=self.config.backward_tol)  # fmt: skip
        return self

    # --------------------------------------------------------------------------- forward pass
    def used_tensors(self) -> dict[str, torch.Tensor]:
        """``W``, ``U``, ``b`` as the forward pass uses them (quantized, fake-quantized or float)."""
        return self._used()[0]

    def _used(self) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """:meth:`used_tensors` and the float ``W`` when the forward pass fake-quantizes it (STE
        or margin-aware QAT: its constants cap the training solves' step), else
        ``None``."""
        W, U, b = self.weight(), self.U.weight, self.U.bias
        q = self.quant
        if q is None:
            return {"W": W, "U": U, "b": b}, None
        if q.mode == "quantized":
            t = q.tensors
            return {"W": t.get("W", W), "U": t.get("U", U), "b": t.get("b", b)}, None
        if q.method in ("ste", "margin-aware"):
            out = {"W": W, "U": U, "b": b}
            for name in q.config.mondeq_targets:
                out[name] = q.fake(name, out[name])
            return out, (W if out["W"] is not W else None)
        return {"W": W, "U": U, "b": b}, None  # ProxQuant: the prox steps move the float weights

    def effective_weight(self) -> torch.Tensor:
        return self.used_tensors()["W"]

    def forward(self, x: torch.Tensor, W: torch.Tensor | None = None,  # type: ignore[override]
                U: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        used, ref = self._used()
        q = F.linear(x, (used["U"] if U is None else U).to(x.dtype),
                     (used["b"] if b is None else b).to(x.dtype))  # fmt: skip
        if W is not None:
            return self.solver(W.to(q.dtype), q)
        return self.solver(used["W"].to(q.dtype), q, step_from=ref)

    def install_prox(self, q: LayerQuant, total_steps: int = 1000, lam_max: float = 5.0) -> None:
        """Attach ProxQuant's driver to ``q``: the prox toward the ``q.config.bits``-bit uniform
        grid of ``W`` (``proxquant-W``, free ``W``) or of ``A`` and ``B``
        (``proxquant-factors``), with ``lam_t`` linear from 0 to ``lam_max`` over ``total_steps``."""
        params = [self.W] if q.method == "proxquant-W" else [self.A, self.B]
        q.prox = _prox_driver(q.config, params, total_steps, lam_max)

    def qat_penalty(self) -> torch.Tensor:
        """The margin-aware penalty ``relu(tau - margin(Q_b(W)))`` (0 for other methods)."""
        q = self.quant
        W = self.weight()
        if q is None or q.mode != "qat" or q.margin_target is None:
            return torch.zeros((), dtype=W.dtype, device=W.device)
        return F.relu(q.margin_target - margin_tensor(self.effective_weight()))

    # ------------------------------------------------------------------------ saving, repr
    def get_extra_state(self) -> dict[str, Any]:
        return {"format": EXTRA_STATE_FORMAT, "config": self.config.as_dict(),
                "quant": self.quant.state() if self.quant is not None else None}  # fmt: skip

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("format") != EXTRA_STATE_FORMAT:
            raise CheckpointError("not a monquant MonDEQ layer state (format mismatch)")
        cfg = MonDEQConfig(**state["config"])
        for k in _ARCHITECTURE:
            if getattr(cfg, k) != getattr(self.config, k):
                raise CheckpointError(f"MonDEQ state has {k}={getattr(cfg, k)!r}, the layer "
                                      f"{getattr(self.config, k)!r}")  # fmt: skip
        s = cfg.solver_config()
        self.configure_solver(**s.as_dict(), backward=cfg.backward)
        self.quant = _restored(self, state.get("quant"), self.U.weight.device)

    def extra_repr(self) -> str:
        c = self.config
        s = self.solver.forward_config
        if self.free:
            m = "free W (no structural margin: certify it)"
        else:
            kind = "learned" if c.learn_margin else "fixed"
            now = float(self.margin().detach())
            m = f"W-K, m = softplus(m_raw) + {c.margin_floor:g} ({kind}, now {now:.4g})"
        rank = f", rank={c.rank}" if c.rank else ""
        solver = f"{s.method}(tol={s.tol:g}, max_iter={s.max_iter})"
        quant = f", quant={self.quant.describe()}" if self.quant is not None else ""
        return (f"in_features={c.in_features}, hidden={c.hidden}{rank}, margin: {m}, "
                f"solver={solver}, backward={c.backward}{quant}")  # fmt: skip


class _QuantState:
    """Mixin: a layer whose quantization state (``quant``, a :class:`LayerQuant` or ``None``) is
    its module's extra state, so ``load_state_dict`` into a fresh layer restores it."""

    quant: LayerQuant | None

    def get_extra_state(self) -> dict[str, Any]:
        return {"format": EXTRA_STATE_FORMAT,
                "quant": self.quant.state() if self.quant is not None else None}  # fmt: skip

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("format") != EXTRA_STATE_FORMAT:
            raise CheckpointError(f"not a monquant {type(self).__name__} layer state (format mismatch)")
        device = next(iter(self.parameters())).device  # type: ignore[attr-defined]
        self.quant = _restored(self, state.get("quant"), device)


class ConvMonDEQ(_QuantState, ConvMonDEQLayer):
    """A single-convolution MonDEQ layer: ``x`` of shape ``(batch, in_channels, H, W)`` maps to the
    equilibrium ``z* = relu(W z* + U x)`` of shape ``(batch, channels, H, W)``.

    ``W = (1 - m) I - A^T A + B - B^T`` with ``A`` (``rank x channels x k x k``) and ``B``
    (``channels x channels x k x k``) circular convolutions
    (:class:`~monquant.operators.conv.ConvWKOperator`): monotone with margin ``>= m`` by
    construction, for any parameters. ``U`` is an ordinary (zero-padded) ``k x k`` convolution of
    the input. PR's resolvent is one ``c x c`` inverse per 2-D frequency (FFT), and the implicit
    backward runs through the operator protocol. ``margin``: the initial ``m``, learned as
    ``softplus(m_raw) + margin_floor`` unless ``learn_margin=False``. It is the
    :class:`~monquant.conv_model.ConvMonDEQLayer` of ``monquant train --arch conv`` with the
    quantization state of the library API.

    The float layer's convergence is guaranteed by its construction. ``monquant.quantize_``
    quantizes its *composite kernel* (the one ``c x c x (2k-1) x (2k-1)`` kernel of ``W``, the
    analogue of quantizing a dense ``W``); the layer then runs on that circular convolution and
    ``monquant.certify_model`` certifies it against the float one from the Fourier blocks
    (:func:`monquant.certify_conv.certify_conv`). ``monquant.prepare_qat`` trains it
    quantization-aware: on ``Q_b(K)`` with straight-through gradients (STE, margin-aware) or with
    ProxQuant on the factor kernels, and ``monquant.convert`` deploys ``K~``. The quantization
    state lives in the extra state.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        image: tuple[int, int],
        kernel: int = 3,
        *,
        rank: int | None = None,
        margin: float = 0.5,
        learn_margin: bool = True,
        margin_floor: float = 0.0,
        init_scale: float = 0.1,
        solver: str = "pr",
        tol: float = 1e-4,
        max_iter: int = 2000,
        anderson: int = 0,
    ) -> None:
        cfg = ConvMonDEQConfig(
            in_channels=in_channels, image=image, channels=channels, kernel=kernel, rank=rank,
            out_features=1, pool=1, margin_init=margin, learn_margin=learn_margin,
            margin_floor=margin_floor, init_scale=init_scale,
            solver=SolverConfig(method=solver, tol=tol, max_iter=max_iter, anderson=anderson).as_dict(),
        )  # fmt: skip
        super().__init__(cfg)
        #: quantization: a LayerQuant whose tensors hold the quantized composite kernel "K"
        self.quant: LayerQuant | None = None

    @property
    def margin_floor(self) -> float:
        return self.config.margin_floor

    def _fakes_kernel(self) -> bool:
        """Whether the forward pass fake-quantizes the composite kernel (STE / margin-aware QAT)."""
        q = self.quant
        return q is not None and q.mode == "qat" and q.method in ("ste", "margin-aware")

    def effective_weight(self) -> torch.Tensor:
        """The composite kernel the forward pass uses: under STE or margin-aware QAT ``Q_b(K)``
        with straight-through gradients (per output channel: dim 0), else the layer's own."""
        K = super().effective_weight()
        return self.quant.fake("W", K) if self._fakes_kernel() else K  # type: ignore[union-attr]

    def used_operator(self, W: torch.Tensor | None = None) -> Any:
        from monquant.operators.conv import CircularConvOperator

        if W is None and self._fakes_kernel():
            return CircularConvOperator(self.effective_weight(), self.image, checked=True)
        return super().used_operator(W)

    def deployed_operator(self) -> Any:
        """The operator the forward pass uses: the quantized composite kernel's circular
        convolution when quantized, else the layer's (float or QAT-transformed) operator."""
        from monquant.operators.conv import CircularConvOperator

        if self.quant is not None and self.quant.mode == "quantized":
            return CircularConvOperator(self.quant.tensors["K"], self.image, checked=True)
        return self.used_operator()

    def install_prox(self, q: LayerQuant, total_steps: int = 1000, lam_max: float = 5.0) -> None:
        """Attach ProxQuant's driver to ``q`` (``proxquant-factors``): the prox toward the
        ``q.config.bits``-bit uniform grids of the factor kernels ``A`` and ``B`` (per output
        channel with ``per-channel``), ``lam_t`` linear from 0 to ``lam_max`` over ``total_steps``.
        The operator assembled from factors on their grids is monotone by construction."""
        q.prox = _prox_driver(q.config, [self.A, self.B], total_steps, lam_max)

    def qat_penalty(self) -> torch.Tensor:
        """The margin-aware penalty ``relu(tau - margin(Q_b(K)))``, the exact margin of the
        fake-quantized kernel's circular convolution from its Fourier blocks, differentiable
        (0 for other methods)."""
        q = self.quant
        if q is None or q.mode != "qat" or q.margin_target is None:
            return torch.zeros((), dtype=self.B.dtype, device=self.B.device)
        return F.relu(q.margin_target - self.margin_of(self.effective_weight()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        q = self.injection(x)
        op = self.deployed_operator()
        ref = self.operator() if self._fakes_kernel() else None  # QAT: the float operator caps the step
        return self.solver(op.to(dtype=q.dtype) if op.dtype != q.dtype else op, q, step_from=ref)

    def extra_repr(self) -> str:
        s = self.solver.forward_config
        k = int(self.B.shape[-1])
        return (f"channels={self.B.shape[0]}, rank={self.A.shape[0]}, {k}x{k} factors, image="
                f"{self.image[0]}x{self.image[1]}, margin: W-K, m = softplus(m_raw) + "
                f"{self.margin_floor:g} (now {float(self.margin().detach()):.4g}), "
                f"solver={s.method}(tol={s.tol:g}, max_iter={s.max_iter})"
                + (f", quant={self.quant.config.bits}-bit {self.quant.config.granularity} "
                   f"composite kernel ({self.quant.method}, {self.quant.mode})"
                   if self.quant is not None else ""))  # fmt: skip


class MultiTierMonDEQ(_QuantState, MultiTierMonDEQLayer):
    """A multi-tier convolutional MonDEQ layer: ``x`` of shape ``(batch, in_channels, H, W)`` maps
    to the equilibrium ``z* = relu(W z* + q)`` on ``T = len(channels)`` tiers of ``H x W``,
    ``H/2 x W/2``, ... (``channels[i]`` channels on tier ``i``).

    ``W`` is the multi-tier Winston-Kolter form of
    :class:`~monquant.operators.multitier.MultiTierWKOperator`: block lower bidiagonal, circular
    ``k x k`` convolutions on each tier and stride-2 couplings from each tier to the next,
    monotone with margin ``>= m`` by construction. The injection is ``q_0 = U x + b_0`` on tier 0
    (an ordinary zero-padded convolution) and a learned per-channel bias ``b_i`` on the others.
    PR's resolvent is a forward substitution over the tiers, one ``c_i x c_i`` inverse per
    frequency; the backward is the implicit adjoint solve through the protocol. It is the
    :class:`~monquant.multitier_model.MultiTierMonDEQLayer` of ``monquant train --arch multitier``
    with the quantization state of the library API.

    ``output="last"`` (default) returns the coarsest tier ``(batch, c_{T-1}, H_{T-1}, W_{T-1})``;
    ``"all"`` the flattened state ``(batch, sum_i c_i H_i W_i)`` (:meth:`split` gives the tiers).
    ``monquant.quantize_`` quantizes the operator's composite kernels (one per diagonal block and
    per coupling, each on its own grid) and the layer then runs on them;
    ``monquant.certify_model`` certifies them by the Weyl tier with a proved ``||dW||``
    (:func:`monquant.certify_multitier.certify_multitier`). The quantization state lives in the
    extra state, so a reload into a fresh layer restores it.
    """

    def __init__(
        self,
        in_channels: int,
        channels: tuple[int, ...] | list[int],
        image: tuple[int, int],
        kernel: int = 3,
        *,
        rank: int | None = None,
        margin: float = 0.5,
        learn_margin: bool = True,
        margin_floor: float = 0.0,
        init_scale: float = 0.1,
        output: str = "last",
        solver: str = "pr",
        tol: float = 1e-4,
        max_iter: int = 2000,
        anderson: int = 0,
    ) -> None:
        cfg = MultiTierMonDEQConfig(
            in_channels=in_channels, image=image, tier_channels=tuple(channels), kernel=kernel,
            rank=rank, out_features=1, margin_init=margin, learn_margin=learn_margin,
            margin_floor=margin_floor, init_scale=init_scale, output=output,
            solver=SolverConfig(method=solver, tol=tol, max_iter=max_iter, anderson=anderson).as_dict(),
        )  # fmt: skip
        super().__init__(cfg)
        #: quantization: a LayerQuant whose tensors hold the composite kernels "diag<i>", "down<i>"
        self.quant: LayerQuant | None = None

    def deployed_operator(self) -> Any:
        """The quantized composite kernels' operator when quantized, else the one the layer
        trains on (float, or fake-quantized under STE QAT)."""
        from monquant.operators.multitier import MultiTierConvOperator

        if self.quant is not None and self.quant.mode == "quantized":
            t, T = self.quant.tensors, len(self.channels)
            return MultiTierConvOperator([t[f"diag{i}"] for i in range(T)],
                                         [t[f"down{i}"] for i in range(T - 1)], self.image,
                                         checked=True)  # fmt: skip
        return self.used_operator()

    def used_operator(self, W: Any = None) -> Any:
        """Under STE QAT: every composite kernel (one per diagonal block and per coupling)
        fake-quantized on its own grid, with straight-through gradients to the factors, as
        ``quantize_`` would quantize them; else as the float layer."""
        q = self.quant
        if W is not None or not self._fakes_tiers():
            return super().used_operator(W)
        assert q is not None
        c = q.config
        return fake_quant_tiers(self.operator(), c.bits, c.granularity_of("W"), c.step_rule)

    def _fakes_tiers(self) -> bool:
        """Whether the forward pass fake-quantizes the composite kernels (STE QAT)."""
        q = self.quant
        return q is not None and q.mode == "qat" and q.method == "ste"

    def install_prox(self, q: LayerQuant, total_steps: int = 1000, lam_max: float = 5.0) -> None:
        """Attach ProxQuant's driver to ``q`` (``proxquant-factors``): every factor kernel (the
        tiers' ``P_i``, ``B_i`` and the couplings' ``Q_i``) moves toward its own ``q.config.bits``
        -bit uniform grid, ``lam_t`` linear from 0 to ``lam_max`` over ``total_steps``. The operator
        assembled from factors on their grids is monotone by construction."""
        q.prox = _prox_driver(q.config, [*self.P, *self.Q, *self.B], total_steps, lam_max)

    def forward(self, x: torch.Tensor, W: Any = None) -> torch.Tensor:
        if W is not None:
            return self.solve(x, self.operator_of(W))
        ref = self.operator() if self._fakes_tiers() else None  # QAT: the float operator caps the step
        return self.solve(x, self.deployed_operator(), step_from=ref)

    def extra_repr(self) -> str:
        s = self.solver.forward_config
        tiers = ", ".join(f"{c}x{h}x{w}" for c, (h, w) in zip(self.channels, self.images, strict=True))
        return (f"tiers=[{tiers}], {self.kernel}x{self.kernel} factors, margin: multi-tier W-K, "
                f"m = softplus(m_raw) + {self.config.margin_floor:g} "
                f"(now {float(self.margin().detach()):.4g}), "
                f"solver={s.method}(tol={s.tol:g}, max_iter={s.max_iter})"
                + (f", quant={self.quant.config.bits}-bit {self.quant.config.granularity} "
                   f"composite kernels ({self.quant.method}, {self.quant.mode})"
                   if self.quant is not None else ""))  # fmt: skip


class _QuantLayer:
    """Mixin: an ordinary layer whose ``weight`` holds ``Q_b(weight)`` (values on the grid)."""

    qconfig: QuantConfig

    def _quantize_weight(self) -> None:
        w = self.weight  # type: ignore[attr-defined]
        c = self.qconfig
        with torch.no_grad():
            w.copy_(quantize(w, c.bits, c.granularity, step_rule=c.step_rule).dequantized())

    def _adopt(self, layer: nn.Module, config: QuantConfig) -> None:
        """Take ``layer``'s parameters and quantize the weight with ``config``."""
        self.qconfig = config
        self.load_state_dict({**layer.state_dict(), "_extra_state": self.get_extra_state()})  # type: ignore[attr-defined]
        self._quantize_weight()

    def extra_repr(self) -> str:
        c = self.qconfig
        return f"{super().extra_repr()}, weight {c.bits}-bit {c.granularity}"  # type: ignore[misc]

    def get_extra_state(self) -> dict[str, Any]:
        return {"format": EXTRA_STATE_FORMAT, "qconfig": self.qconfig.to_dict()}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("format") != EXTRA_STATE_FORMAT:
            raise CheckpointError("not a monquant quantized-layer state (format mismatch)")
        self.qconfig = QuantConfig.from_dict(state["qconfig"])


class QuantLinear(_QuantLayer, nn.Linear):
    """``nn.Linear`` whose weight is ``Q_b``-quantized (per output row with ``per-channel``)."""

    @classmethod
    def from_float(cls, layer: nn.Linear, config: QuantConfig) -> QuantLinear:
        p = layer.weight
        out = cls(layer.in_features, layer.out_features, bias=layer.bias is not None,
                  device=p.device, dtype=p.dtype)  # fmt: skip
        out._adopt(layer, config)
        return out


class QuantConv2d(_QuantLayer, nn.Conv2d):
    """``nn.Conv2d`` whose weight is ``Q_b``-quantized (per output channel with ``per-channel``)."""

    @classmethod
    def from_float(cls, layer: nn.Conv2d, config: QuantConfig) -> QuantConv2d:
        if not isinstance(layer.padding, tuple | int):
            raise ConfigError("QuantConv2d: string padding is not supported")
        p = layer.weight
        out = cls(layer.in_channels, layer.out_channels, layer.kernel_size,  # type: ignore[arg-type]
                  layer.stride, layer.padding, layer.dilation,  # type: ignore[arg-type]
                  layer.groups, layer.bias is not None, layer.padding_mode,
                  device=p.device, dtype=p.dtype)  # fmt: skip
        out._adopt(layer, config)
        return out
