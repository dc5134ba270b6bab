"""Quantized-training methods as configurations of the one training loop
(:func:`monquant.training.loop.train`).

A :class:`QuantMethod` names a way to obtain a low-bit MonDEQ; :func:`prepare_method` installs it
on a :class:`~monquant.model.MonDEQClassifier` (hooks on the layer, :class:`TrainHooks` for the
loop, overrides of :class:`TrainConfig`); :func:`deployed_weights` returns what is actually
deployed (``W~``, ``U~``) with its certificate, its storage and its cost per solver iteration.
Nothing here is a second training loop.

Methods (``b`` = ``bits``, ``Q_b`` the symmetric uniform quantizer of docs/theory.md section 2)
--------------------------------------------------------------------------------------
- ``ptq``: no training; ``W~ = Q_b(W)`` of the float model.
- ``ste``: QAT; the forward solve uses ``Q_b(W)`` with straight-through gradients; ``W~ = Q_b(W)``.
- ``margin``: margin-aware QAT: ``ste`` plus penalties that keep the *quantized* operator strongly
  monotone (see below); ``W~ = Q_b(W)``.
- ``proxquant-w``: ProxQuant on the assembled ``W`` (placement (a)). The layer uses
  ``parameterization="free"`` (``W`` itself is the parameter; :func:`free_copy` builds it from a
  W-K model so every method starts from the same float weights). After every optimizer step
  ``W <- prox_{eta lam_t R}(W)`` with ``R`` the W-shaped distance to the grid; at ``freeze_epoch``
  ``W`` is hard-quantized and frozen, so ``W~`` is the trained parameter itself. Nothing keeps a
  free ``W`` monotone: the certificate decides. Its defaults add the same guard as margin-aware
  QAT (lift, then ``P_eig`` on the grid point ``nearest(W)`` through a straight-through gradient):
  without it, at 2 bits the prox drove ``margin(W~)`` to -0.63 on MNIST.
- ``proxquant-factors``: ProxQuant on ``A`` and ``B`` (placement (b)); ``m`` stays a float scalar.
  The deployed operator is ``W~ = (1 - m) I - A~^T A~ + B~ - B~^T`` with ``sym(I - W~) =
  m I + A~^T A~ >= m I``: certified at every bit-width by construction (and verified exactly).

``mode="lazy"`` turns either ProxQuant placement into STE/BinaryConnect through the same
interface (the forward pass uses the hard-quantized parameters, gradients pass straight through).
``u_bits`` quantizes the input injection ``U`` too (mixed precision when ``u_bits != bits``): with
fake quantization for ``ste``/``margin``, by the same prox for the ProxQuant kinds, post hoc for PTQ.

Margin-aware QAT: the penalties and why both
--------------------------------------------
With ``W~ = Q_b(W)`` (STE: ``dW~/dW := I``) the loss gets

    P_eig  = w_eig  * relu(tau - lmin(sym(I - W~)))                       (exact-tier target)
    P_weyl = w_weyl * relu(||sg(W~) - W||_F / lmin(sym(I - W)) - rho)     (Weyl-tier target)

``sg`` is stop-gradient (under STE ``W~ - W`` has zero derivative, so the quantized point is held
as a constant target). ``P_eig`` is :func:`monquant.training.loop.margin_penalty` (``TrainConfig``
``margin_target``/``margin_weight``): it acts only while the quantized margin is below ``tau`` and
moves ``W`` along the eigenvector of the smallest eigenvalue, the one direction that raises
``margin(W~)``. It certifies the exact tier but says nothing about ``||dW||``. ``P_weyl`` bounds
``||dW|| <= ||dW||_F`` relative to the float margin, so ``rho < 1`` certifies the Weyl tier
(Theorem 2) and through Theorem 3 also the displacement of the equilibria; it pulls ``W`` toward
its own grid point (a quadratic prox-like pull, like ProxQuant's squared-L2 regularizer) and
raises ``m``. Both need a start where ``Q_b(W)`` is already monotone: ``lift`` (:func:`margin_lift`)
raises ``m`` just enough before training; without it the very first solves on a non-monotone
``Q_b(W)`` diverged (NaN) at 2 bits.

Measured on MNIST (the seed-0 float model of ``monquant lowbit``: 98.14%, m = 0.502; 3 epochs of
fine-tuning on 20,000 samples; per-tensor; accuracy / margin(W~) / ||dW||/m / tier):

    variant                         2 bits                        3 bits
    plain STE                       diverged (NaN), first epoch   97.73 / -0.073 / 2.14 / none
    lift + P_eig only (tau 0.1)     97.50 / 0.187 / 3.89 / exact  97.73 / 0.120 / 2.23 / exact
    lift + P_weyl only (rho 0.5)    97.58 / 0.692 / 0.33 / weyl   97.52 / 0.873 / 0.16 / weyl
    lift + both, rho 0.5            identical to P_weyl only (P_eig never fired)
    lift + both, rho 1.0 (default)  97.58 / 0.675 / 0.35 / weyl   97.74 / 0.774 / 0.31 / weyl

So: ``P_eig`` alone certifies only the exact tier (``||dW|| > 2 m``); ``P_weyl`` reaches the Weyl
tier, and its Frobenius target ``rho = 1`` (enough, since ``||dW|| <= ||dW||_F``) costs no accuracy
while ``rho = 0.5`` over-raises ``m`` and costs 0.2% at 3 bits (per-channel 3 bits: 97.55 with 0.5,
97.76 with 1.0). The defaults keep ``P_eig`` as the safety net that acts whenever the quantized
margin drops below ``tau`` (it is free while inactive).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from monquant.certify import Certificate, certify
from monquant.certify_conv import certify_conv
from monquant.conv_model import ConvMonDEQClassifier, conv_margin_tensor
from monquant.errors import ConfigError
from monquant.model import MonDEQClassifier, softplus_inverse
from monquant.names import QUANT_METHODS
from monquant.operators import margin, margin_tensor, wk_weight
from monquant.operators.conv import ConvWKOperator, fourier_blocks
from monquant.quant.prox import Grid, ProxQuantizer, lambda_schedule
from monquant.quant.uniform import GRANULARITIES, check_bits, fake_quant, quantize, storage_bits
from monquant.training.loop import TrainConfig, TrainHooks

__all__ = [
    "KINDS",
    "TRAINED_KINDS",
    "DeployedWeights",
    "PreparedMethod",
    "QuantMethod",
    "apply_lift",
    "conv_layer_counts",
    "deployed_weights",
    "finetune_method",
    "free_copy",
    "layer_storage_bits",
    "margin_lift",
    "prepare_method",
    "products_per_iteration",
    "weyl_penalty",
]

KINDS: tuple[str, ...] = QUANT_METHODS
TRAINED_KINDS: tuple[str, ...] = KINDS[1:]
PROX_KINDS: tuple[str, ...] = ("proxquant-w", "proxquant-factors")
FLOAT_BITS = 32


@dataclass(frozen=True)
class QuantMethod:
    """One way to obtain a ``bits``-bit MonDEQ (see the module docstring for the kinds).

    ``granularity``: ``per-tensor`` or ``per-channel`` (one scale per row; ProxQuant's
    ``per-channel``). ``u_bits``: also quantize ``U`` (``None``: float ``U``, as the paper).
    ProxQuant: ``regularizer`` (``l1``/``l2``), ``schedule`` (``linear``/``constant``/
    ``exponential``) of ``lam_t`` reaching ``lam_max`` at ``freeze_epoch`` (``None``: freeze at the
    end of training), prox strength ``lr * lam_t`` with ``lr`` the base learning rate; ``mode``:
    ``prox`` or ``lazy`` (STE through the same interface). Penalties (module docstring):
    ``margin_target`` (tau) / ``margin_weight`` for ``P_eig``, ``weyl_target`` (rho) /
    ``weyl_weight`` for ``P_weyl``; ``None`` targets switch them off. ``lift``: before training,
    raise the margin parameter just enough that ``margin(Q_b(W)) >= margin_target``
    (:func:`margin_lift`). ``robust_eps``: train with the Lipschitz-margin loss at that L2 radius
    (:mod:`monquant.training.robust`; any trained kind).
    """

    kind: str
    bits: int
    granularity: str = "per-tensor"
    u_bits: int | None = None
    regularizer: str = "l1"
    schedule: str = "linear"
    lam_max: float = 5.0
    freeze_epoch: int | None = None
    mode: str = "prox"
    margin_target: float | None = None
    margin_weight: float = 1.0
    weyl_target: float | None = None
    weyl_weight: float = 0.1
    lift: bool = False
    robust_eps: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown method kind {self.kind!r}; choose one of {KINDS}")
        if self.robust_eps is not None:
            if self.kind == "ptq":
                raise ConfigError("robust_eps needs a trained method (PTQ does not train)")
            if not (math.isfinite(self.robust_eps) and self.robust_eps > 0):
                raise ConfigError(f"robust_eps must be a finite number > 0, got {self.robust_eps}")
        object.__setattr__(self, "bits", check_bits(self.bits))
        if self.u_bits is not None:
            object.__setattr__(self, "u_bits", check_bits(self.u_bits))
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {GRANULARITIES}")
        if self.mode not in ("prox", "lazy"):
            raise ConfigError(f"mode must be 'prox' or 'lazy', got {self.mode!r}")
        if self.regularizer not in ("l1", "l2"):
            raise ConfigError(f"regularizer must be 'l1' or 'l2', got {self.regularizer!r}")
        if self.freeze_epoch is not None and self.freeze_epoch < 0:
            raise ConfigError("freeze_epoch must be >= 0")

    @classmethod
    def default(
        cls, kind: str, bits: int, granularity: str = "per-tensor", u_bits: int | None = None
    ) -> QuantMethod:
        """The settings ``monquant lowbit`` uses for ``kind`` (the penalties it is defined by)."""
        extra: dict[str, Any] = {}
        if kind == "margin":
            extra = {"margin_target": 0.1, "weyl_target": 1.0, "lift": True}
        elif kind == "proxquant-w":
            extra = {"margin_target": 0.1, "lift": True}
        return cls(kind, bits, granularity, u_bits, **extra)

    @property
    def label(self) -> str:
        """Short name, e.g. ``margin/per-channel/W3`` or ``ptq/per-tensor/W4U8``."""
        u = f"U{self.u_bits}" if self.u_bits is not None else ""
        lm = f"+lm{self.robust_eps:g}" if self.robust_eps is not None else ""
        return f"{self.kind}{lm}/{self.granularity}/W{self.bits}{u}"

    @property
    def factored(self) -> bool:
        """Whether ``W~`` is deployed as quantized factors (four products per iteration)."""
        return self.kind == "proxquant-factors"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------ penalties


def weyl_penalty(W: torch.Tensor, bits: int, granularity: str, rho: float,
                 image: tuple[int, int] | None = None) -> torch.Tensor:  # fmt: skip
    """``relu(||sg(Q_b(W)) - W||_F / lmin(sym(I - W)) - rho)``: a Weyl-tier target.

    ``||dW|| <= ||dW||_F``, so a value of 0 with ``rho < 1`` certifies ``||dW|| < m`` (Theorem 2);
    ``rho = 1`` does too unless ``dW`` has rank one (the only case with ``||dW|| = ||dW||_F``).
    The quantized point is a constant (stop-gradient); the float margin is differentiable
    (smallest eigenvalue). A non-monotone ``W`` (``lmin <= 0``) gets the penalty ``1 - lmin``,
    which pushes its margin up.

    With ``image``, ``W`` is a convolutional layer's composite kernel and the circular
    convolution's norms stand in: ``lmin`` through the Fourier blocks and
    ``||dW|| = max_w ||dK^(w)||_2 <= max_w ||dK^(w)||_F``.
    """
    dW = quantize(W.detach(), bits, granularity).dequantized().to(W.dtype) - W
    if image is None:
        lmin, dnorm = margin_tensor(W), torch.linalg.matrix_norm(dW)
    else:
        lmin = conv_margin_tensor(W, image)
        blocks = fourier_blocks(dW, image, differentiable=True)
        dnorm = torch.linalg.matrix_norm(blocks).max().to(W.dtype)
    if float(lmin.detach()) <= 0:
        return 1.0 - lmin
    return F.relu(dnorm / lmin - rho)


def margin_lift(
    W: torch.Tensor,
    bits: int,
    granularity: str,
    tau: float,
    step: float = 0.01,
    max_shift: float = 2.0,
    image: tuple[int, int] | None = None,
) -> float:
    """Smallest ``delta`` in ``{0, step, 2 step, ..} <= max_shift`` with
    ``margin(Q_b(W - delta I)) >= tau`` (the best one found if none reaches ``tau``).

    In the W-K parameterization raising ``m`` by ``delta`` is exactly ``W -> W - delta I``: the
    float margin rises by ``delta`` and the quantized one by about as much (exactly, when the
    diagonal stays on the grid and ``w_max`` is unchanged). Margin-aware QAT starts from this
    lifted model so that its very first training solves already run on a strongly monotone
    ``W~`` (plain STE from a float model whose ``Q_b(W)`` is not monotone can diverge at once).
    With ``image``, ``W`` is a composite kernel: ``I`` is its centre tap's identity, and the
    margins are the circular convolution's.
    """
    W64 = W.detach().to(torch.float64)
    if image is None:
        eye = torch.eye(W64.shape[0], dtype=torch.float64, device=W64.device)
    else:
        c, kh, kw = W64.shape[0], W64.shape[2], W64.shape[3]
        eye = torch.zeros_like(W64)
        eye[torch.arange(c), torch.arange(c), kh // 2, kw // 2] = 1.0

    def margin_of(K: torch.Tensor) -> float:
        return margin(K) if image is None else float(conv_margin_tensor(K, image))

    best, best_margin = 0.0, -math.inf
    for k in range(int(max_shift / step) + 1):
        delta = k * step
        mq = margin_of(quantize(W64 - delta * eye, bits, granularity).dequantized())
        if mq >= tau:
            return delta
        if mq > best_margin:
            best, best_margin = delta, mq
    return best


@torch.no_grad()
def apply_lift(model: MonDEQClassifier, delta: float) -> None:
    """``W -> W - delta I``: through ``m`` (W-K: ``m_raw`` so that ``m`` grows by ``delta``) or
    directly on a free ``W``."""
    layer = model.layer
    if delta <= 0:
        return
    if layer.free:
        layer.W.sub_(delta * torch.eye(layer.W.shape[0], dtype=layer.W.dtype))
        return
    m = float(F.softplus(layer.m_raw)) + delta
    layer.m_raw.fill_(softplus_inverse(m))


# ----------------------------------------------------------------------------------- preparation


def free_copy(model: MonDEQClassifier) -> MonDEQClassifier:
    """A ``parameterization="free"`` copy of ``model`` with the same ``W``, ``U``, ``b`` and head.

    Placement (a) of ProxQuant trains ``W`` itself; starting it from the W-K model's assembled
    ``W`` (rather than from scratch) makes every method start from the same float network.
    """
    cfg = dataclasses.replace(model.config, parameterization="free")
    out = MonDEQClassifier(cfg).to(next(model.parameters()).device)
    with torch.no_grad():
        out.layer.W.copy_(model.layer.weight().detach())
        out.layer.U.load_state_dict(model.layer.U.state_dict())
        out.head.load_state_dict(model.head.state_dict())
    return out


@dataclass
class PreparedMethod:
    """A model made ready for a :class:`QuantMethod`: hooks for :func:`~monquant.training.loop.train`.

    ``quantizer``: the ProxQuant driver (ProxQuant kinds); ``latent``: the float parameters just
    before the hard quantization (the reference ``W`` of the certificate); ``freeze_step``: the
    optimizer step at which the weights were frozen.
    """

    method: QuantMethod
    model: MonDEQClassifier
    hooks: TrainHooks
    quantizer: ProxQuantizer | None = None
    latent: dict[str, torch.Tensor] = field(default_factory=dict)
    freeze_epoch: int | None = None
    events: list[str] = field(default_factory=list)

    def train_config(self, base: TrainConfig) -> TrainConfig:
        """``base`` with the method's QAT and eigenvalue-penalty settings."""
        m = self.method
        qat = m.kind in ("ste", "margin")
        return dataclasses.replace(
            base,
            qat_bits=m.bits if qat else None,
            qat_granularity=m.granularity,
            margin_target=m.margin_target if qat else None,
            margin_weight=m.margin_weight,
            robust_eps=m.robust_eps,
        )


def _grid(method: QuantMethod, bits: int) -> Grid:
    return Grid("uniform", bits, method.granularity)


def _prox_params(model: MonDEQClassifier, method: QuantMethod) -> dict[str, torch.Tensor]:
    layer = model.layer
    names = ("W",) if method.kind == "proxquant-w" else ("A", "B")
    params = {n: getattr(layer, n) for n in names}
    if method.u_bits is not None:
        params["U"] = layer.U.weight
    return params


def _image(model: Any) -> tuple[int, int] | None:
    """The state's image of a convolutional model (``None`` for a dense one)."""
    return model.config.image if isinstance(model, ConvMonDEQClassifier) else None


def _check_parameterization(model: MonDEQClassifier, method: QuantMethod) -> None:
    if method.kind == "proxquant-w" and _image(model) is not None:
        raise ConfigError("proxquant-w (a free W) is not available for convolutional models: use "
                          "proxquant-factors (ProxQuant on A and B: monotone by construction)")  # fmt: skip
    free = model.layer.free
    if method.kind == "proxquant-w" and not free:
        raise ConfigError("proxquant-w needs parameterization='free' (use free_copy(model))")
    if method.kind != "proxquant-w" and free:
        raise ConfigError(f"{method.kind} needs the W-K parameterization (A, B, m)")


def _install_fake_u(model: MonDEQClassifier, method: QuantMethod) -> None:
    """STE fake quantization of ``U`` (``ste``/``margin`` with ``u_bits``)."""
    ub, gran = method.u_bits, method.granularity
    if ub is None:
        model.layer.factor_transform = None
        return
    model.layer.factor_transform = lambda name, t: fake_quant(t, ub, gran) if name == "U" else t


def _install_prox_transforms(prep: PreparedMethod, names: dict[str, torch.Tensor]) -> None:
    """Forward through ``forward_weight`` (identity in prox mode, STE in lazy mode)."""
    pq = prep.quantizer
    assert pq is not None
    layer = prep.model.layer
    factors = set(names) & {"A", "B", "U"}
    layer.weight_transform = pq.forward_weight if "W" in names else None
    layer.factor_transform = lambda name, t: pq.forward_weight(t) if name in factors else t


def _freeze(prep: PreparedMethod, names: dict[str, torch.Tensor], epoch: int) -> None:
    """Snapshot the latent floats, then hard-quantize and freeze them (once)."""
    pq = prep.quantizer
    if pq is None or pq.frozen:
        return
    prep.latent = {n: p.detach().clone() for n, p in names.items()}
    pq.freeze()
    prep.freeze_epoch = epoch
    prep.events.append(f"froze {', '.join(names)} at the start of epoch {epoch + 1}")


def _prox_hooks(
    prep: PreparedMethod, names: dict[str, torch.Tensor], epochs: int, lr: float
) -> TrainHooks:
    pq = prep.quantizer
    assert pq is not None
    freeze_at = prep.method.freeze_epoch if prep.method.freeze_epoch is not None else epochs

    def on_epoch_start(model: MonDEQClassifier, epoch: int) -> None:
        _install_prox_transforms(prep, names)  # train() resets weight_transform when qat is off
        if epoch >= freeze_at:
            _freeze(prep, names, epoch)

    def after_step(model: MonDEQClassifier, step: int) -> None:
        pq.after_step(step, lr)

    def on_epoch_end(model: MonDEQClassifier, epoch: int) -> None:
        if epoch == epochs - 1:
            _freeze(prep, names, epoch + 1)

    return TrainHooks(
        after_step=after_step, on_epoch_start=on_epoch_start, on_epoch_end=on_epoch_end
    )


def _penalty_hook(prep: PreparedMethod) -> Callable[[MonDEQClassifier], torch.Tensor] | None:
    """``P_weyl`` (if ``weyl_target``) plus, for ``proxquant-w``, ``P_eig`` on the grid point
    ``nearest(W)`` (straight-through): the weight that will be deployed, not the float one."""
    m = prep.method
    terms: list[Callable[[MonDEQClassifier], torch.Tensor]] = []
    if m.weyl_target is not None:
        rho, w = m.weyl_target, m.weyl_weight
        terms.append(lambda model: w * weyl_penalty(model.layer.weight(), m.bits, m.granularity,
                                                    rho, _image(model)))  # fmt: skip
    pq = prep.quantizer
    if m.kind == "proxquant-w" and m.margin_target is not None and pq is not None:
        tau, w_eig = m.margin_target, m.margin_weight
        terms.append(lambda model: w_eig * F.relu(tau - margin_tensor(pq.quantized(model.layer.W))))
    if not terms:
        return None
    return lambda model: sum((t(model) for t in terms), torch.zeros(()))


def prepare_method(
    model: MonDEQClassifier,
    method: QuantMethod,
    steps_per_epoch: int,
    epochs: int,
    lr: float = 1e-3,
) -> PreparedMethod:
    """Install ``method`` on ``model`` and return the hooks for :func:`~monquant.training.loop.train`.

    Train with ``train(model, ..., prepared.train_config(cfg), hooks=prepared.hooks)``.
    ProxQuant: ``lam_t`` follows ``method.schedule`` over the steps before the freeze
    (``freeze_epoch * steps_per_epoch``, at least one) and the prox strength is ``lr * lam_t``.
    The weights are frozen at the start of ``freeze_epoch`` (0-based) or after the last epoch.
    """
    _check_parameterization(model, method)
    model.layer.weight_transform = None
    model.layer.factor_transform = None
    prep = PreparedMethod(method, model, TrainHooks())
    if method.lift and method.margin_target is not None:
        delta = margin_lift(model.layer.weight(), method.bits, method.granularity,
                            method.margin_target, image=_image(model))  # fmt: skip
        apply_lift(model, delta)
        prep.events.append(f"lifted the margin by {delta:.3g} before training")
    if method.kind in ("ste", "margin"):
        _install_fake_u(model, method)
    if method.kind not in PROX_KINDS:
        prep.hooks = TrainHooks(penalty=_penalty_hook(prep))
        return prep
    names = _prox_params(model, method)
    freeze_at = method.freeze_epoch if method.freeze_epoch is not None else epochs
    total = max(1, min(freeze_at, epochs) * steps_per_epoch)
    schedule = lambda_schedule(method.schedule, lam_max=method.lam_max, total_steps=total)  # type: ignore[arg-type]
    prep.quantizer = ProxQuantizer(
        [(p, _grid(method, method.u_bits if n == "U" else method.bits)) for n, p in names.items()],
        schedule,
        regularizer=method.regularizer,  # type: ignore[arg-type]
        mode=method.mode,  # type: ignore[arg-type]
    )
    hooks = _prox_hooks(prep, names, epochs, lr)
    prep.hooks = dataclasses.replace(hooks, penalty=_penalty_hook(prep))
    _install_prox_transforms(prep, names)
    return prep


def finetune_method(
    model: MonDEQClassifier,
    method: QuantMethod,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float = 1e-3,
    seed: int = 0,
    eval_limit: int = 1000,
    batch_size: int = 128,
) -> tuple[PreparedMethod, list[dict[str, Any]]]:
    """Install ``method`` on ``model`` and fine-tune it on ``(x, y)`` (nothing for PTQ).

    Adam at ``lr`` decayed x0.1 for the last epoch, the paper's batch size; the per-epoch log
    evaluates on the first ``eval_limit`` fine-tuning samples. Returns the prepared method (for
    :func:`deployed_weights`) and the training log. The protocol of ``monquant lowbit``;
    ``seed`` orders the batches (seed torch's global generator before building ``model``).
    """
    from monquant.data import subset
    from monquant.training.loop import TrainConfig, train

    nb = math.ceil(x.shape[0] / batch_size)
    prep = prepare_method(model, method, nb, epochs, lr)
    if method.kind == "ptq":
        return prep, []
    tcfg = TrainConfig(
        epochs=epochs, lr=lr, batch_size=batch_size, decay_epoch=max(epochs - 1, 1), seed=seed
    )
    hist = train(
        model, x, y, *subset(x, y, eval_limit), prep.train_config(tcfg), hooks=prep.hooks,
        progress=False,
    )  # fmt: skip
    return prep, hist


# ------------------------------------------------------------------------------------ deployment


def products_per_iteration(method: QuantMethod, n: int, rank: int | None = None) -> int:
    """Low-bit multiplies to apply ``W~`` to one vector (one solver iteration, per sample).

    Assembled ``W~``: ``n^2``. Factored ``W~ z = (1 - m) z - A~^T (A~ z) + B~ z - B~^T z``:
    ``2 r n + 2 n^2`` (``4 n^2`` at full rank ``r = n``), plus ``n`` float scalings by ``1 - m``.
    (PR/DR apply the resolvent ``(I + a (I - W~))^{-1}``, a dense float matrix, whatever the form.)
    """
    r = n if rank is None else rank
    return 2 * r * n + 2 * n * n if method.factored else n * n


def layer_storage_bits(
    method: QuantMethod, n: int, d: int, rank: int | None = None, scale_bits: int = FLOAT_BITS
) -> dict[str, int]:
    """Weight storage of the equilibrium layer in bits (codes plus one float per scale).

    ``W``: ``n^2 b`` + scales (assembled), or ``A~`` (``r x n``) and ``B~`` (``n x n``) codes +
    scales + the float ``m`` (factored). ``U``: ``n d u_bits`` + scales, or ``32 n d`` (float).
    The bias and the head are float in every configuration and not counted.
    """
    r = n if rank is None else rank
    g = method.granularity
    if method.factored:
        w = storage_bits((r, n), method.bits, g, scale_bits)
        w += storage_bits((n, n), method.bits, g, scale_bits) + scale_bits
    else:
        w = storage_bits((n, n), method.bits, g, scale_bits)
    ub = method.u_bits
    u = storage_bits((n, d), ub, g, scale_bits) if ub is not None else FLOAT_BITS * n * d
    return {"W": w, "U": u, "total": w + u, "float32_total": FLOAT_BITS * (n * n + n * d)}


@dataclass
class DeployedWeights:
    """What a method deploys and what the weights prove about it.

    ``W_ref``: the float weight the hard quantization started from (PTQ/QAT: the float/latent
    ``W``; ProxQuant: the latent parameters just before the freeze, assembled with the final
    ``m`` for the factored form); ``W_tilde``: the deployed operator (assembled, float64 values
    exactly representable by the codes); ``U``: the deployed injection (quantized or float);
    ``certificate``: ``certify`` of ``W_ref -> W_tilde``; ``requantized``: factored form only,
    the certificate of ``Q_b`` of the assembled product (deploying one ``b``-bit matrix instead of
    the factors: it is *not* on a ``b``-bit grid, so that is a second quantization).
    """

    method: QuantMethod
    W_ref: torch.Tensor
    W_tilde: torch.Tensor
    U: torch.Tensor
    b: torch.Tensor
    certificate: Certificate
    storage: dict[str, int]
    products: int
    m_construction: float | None = None
    requantized: Certificate | None = None

    @property
    def margin_quantized(self) -> float:
        return self.certificate.margin_quantized

    def overrides(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``model(x, ...)`` / ``evaluate(model, x, y, ...)``."""
        dtype = self.b.dtype
        return {"W": self.W_tilde.to(dtype), "U": self.U.to(dtype), "b": self.b}

    def summary(self) -> dict[str, Any]:
        """Plain numbers (JSON-ready)."""
        c = self.certificate
        out: dict[str, Any] = {
            "form": "factored" if self.method.factored else "assembled",
            "tier": "construction" if self.m_construction is not None else c.tier,
            "certified": c.certified_exact,
            "certified_weyl": c.certified_weyl,
            "verdict": c.verdict,
            "margin_quantized_lower": c.margin_quantized_lower,
            "margin_quantized": c.margin_quantized,
            "m": c.margin,
            "dW_norm": c.dW_norm,
            "dW_over_m": c.dW_over_m,
            "L_quantized": c.L_quantized,
            "storage_bits": self.storage,
            "products_per_iteration": self.products,
        }
        if self.m_construction is not None:
            out["m_construction"] = self.m_construction
        if self.requantized is not None:
            out["requantized_tier"] = self.requantized.tier
            out["requantized_margin"] = self.requantized.margin_quantized
        return out


def _on_grid_param(prep: PreparedMethod | None, method: QuantMethod) -> ProxQuantizer:
    if prep is None or prep.quantizer is None:
        raise ConfigError(f"deploying {method.kind} needs its PreparedMethod (the grids)")
    if not prep.quantizer.frozen:
        raise ConfigError(f"{method.kind}: the weights are not frozen yet (train to the end)")
    return prep.quantizer


def _deployed_u(model: MonDEQClassifier, method: QuantMethod) -> torch.Tensor:
    U = model.layer.U.weight.detach()
    if method.u_bits is None or method.kind in PROX_KINDS:
        return U  # float, or already on its grid (frozen ProxQuant parameter)
    return quantize(U, method.u_bits, method.granularity).dequantized()


@torch.no_grad()
def deployed_weights(
    model: MonDEQClassifier, method: QuantMethod, prepared: PreparedMethod | None = None
) -> DeployedWeights:
    """The deployed ``W~`` (and ``U~``), its certificate, storage and multiply count.

    PTQ/STE/margin: ``W~ = Q_b(W)`` certified by ``certify(W, bits, granularity)``. ProxQuant
    kinds need ``prepared`` (the frozen grids): ``W~`` is the frozen parameter (``proxquant-w``)
    or ``(1 - m) I - A~^T A~ + B~ - B~^T`` (``proxquant-factors``), certified with
    ``certify(W_ref, W_tilde=W~)``; the factored form additionally checks
    ``margin(W~) >= m`` (its construction).
    """
    layer = model.layer
    if isinstance(model, ConvMonDEQClassifier):
        return _conv_deployed(model, method, prepared)

    def deployment(W: torch.Tensor, Wt: torch.Tensor, cert: Certificate, **extra) -> DeployedWeights:
        n, d, r = layer.config.hidden, layer.config.in_features, layer.config.rank
        return DeployedWeights(
            method,
            W,
            Wt,
            U=_deployed_u(model, method),
            b=layer.U.bias.detach(),
            certificate=cert,
            storage=layer_storage_bits(method, n, d, r),
            products=products_per_iteration(method, n, r),
            **extra,
        )

    # The certified W~ is the one the model runs: formed (or rounded) in the model's dtype.
    dtype = layer.U.weight.dtype
    if method.kind not in PROX_KINDS:
        W = layer.weight().detach().to(dtype)
        cert = certify(W, method.bits, method.granularity)
        Wt = quantize(W, method.bits, method.granularity).dequantized().to(torch.float64)
        return deployment(W.to(torch.float64), Wt, cert)
    pq = _on_grid_param(prepared, method)
    assert prepared is not None
    if not all(dist == 0.0 for dist in pq.on_grid()):
        raise ConfigError(f"{method.kind}: a frozen parameter is off its grid")
    latent = prepared.latent
    if method.kind == "proxquant-w":
        Wt = layer.W.detach().to(torch.float64)
        W = latent.get("W", layer.W).detach().to(torch.float64)
        return deployment(W, Wt, certify(W, W_tilde=Wt))
    m = float(layer.margin().detach())
    A, B = (layer.A.detach().double(), layer.B.detach().double())
    Wt = wk_weight(A, B, m).to(dtype).to(torch.float64)
    W = wk_weight(latent["A"].double(), latent["B"].double(), m) if latent else Wt
    cert = certify(W, W_tilde=Wt)
    # margin(W~) >= m holds for the float64 construction; rounding it to the model dtype moves the
    # margin by at most ||fl(W~) - W~|| <= n u ||W~||_max.
    slack = Wt.shape[0] * float(torch.finfo(dtype).eps) * max(1.0, float(Wt.abs().max()))
    if cert.margin_quantized < m - slack - 1e-9 * max(1.0, abs(m)):
        raise ConfigError(f"factored W~ has margin {cert.margin_quantized} < m = {m}: a bug")
    requant = certify(Wt, method.bits, method.granularity)
    return deployment(W, Wt, cert, m_construction=m, requantized=requant)


def conv_layer_counts(method: QuantMethod, config: Any) -> tuple[dict[str, int], int]:
    """Weight storage (bits, as :func:`layer_storage_bits`) and low-bit multiplies per solver
    iteration and sample of a convolutional layer: assembled, the composite
    ``c x c x (2k-1)^2`` kernel (``c^2 (2k-1)^2 H W`` multiplies); factored, ``A~`` and ``B~``
    (``(2 r c + 2 c^2) k^2 H W``: ``A``, ``A^T``, ``B``, ``B^T``)."""
    c, k, r = config.channels, config.kernel, config.rank or config.channels
    g, pixels = method.granularity, config.image[0] * config.image[1]
    k2 = 2 * k - 1
    if method.factored:
        w = storage_bits((r, c, k, k), method.bits, g) + storage_bits((c, c, k, k), method.bits, g)
        w += FLOAT_BITS
        products = (2 * r * c + 2 * c * c) * k * k * pixels
    else:
        w = storage_bits((c, c, k2, k2), method.bits, g)
        products = c * c * k2 * k2 * pixels
    ushape = (c, config.in_channels, k, k)
    ub = method.u_bits
    u = storage_bits(ushape, ub, g) if ub is not None else FLOAT_BITS * math.prod(ushape)
    float_w = FLOAT_BITS * (r * c + c * c) * k * k + FLOAT_BITS
    storage = {"W": w, "U": u, "total": w + u, "float32_total": float_w + FLOAT_BITS * math.prod(ushape)}
    return storage, products


def _conv_deployed(model: ConvMonDEQClassifier, method: QuantMethod,
                   prepared: PreparedMethod | None) -> DeployedWeights:  # fmt: skip
    """:func:`deployed_weights` of a convolutional model: ``W~`` is a composite kernel, certified
    from the Fourier blocks (:func:`monquant.certify_conv.certify_conv`)."""
    layer, image = model.layer, model.config.image
    storage, products = conv_layer_counts(method, model.config)

    def deployment(K: torch.Tensor, Kt: torch.Tensor, cert: Certificate, **extra) -> DeployedWeights:
        return DeployedWeights(method, K, Kt, U=_deployed_u(model, method), b=layer.U.bias.detach(),
                               certificate=cert, storage=storage, products=products, **extra)  # fmt: skip

    if method.kind not in PROX_KINDS:
        K = layer.reference_weight()
        cert = certify_conv(K, image, method.bits, method.granularity)
        Kt = quantize(K, method.bits, method.granularity).dequantized().to(torch.float64)
        return deployment(K, Kt, cert)
    pq = _on_grid_param(prepared, method)
    assert prepared is not None
    if not all(dist == 0.0 for dist in pq.on_grid()):
        raise ConfigError(f"{method.kind}: a frozen parameter is off its grid")
    m = float(layer.margin().detach())
    Kt = layer.reference_weight()  # (1 - m) I - A~^T A~ + B~ - B~^T from the frozen factors
    lat = prepared.latent
    K = (ConvWKOperator(lat["A"], lat["B"], m, image).composite_kernel() if lat else Kt)
    cert = certify_conv(K, image, kernel_tilde=Kt)
    if cert.margin_quantized_lower < m * (1 - 1e-6) - 1e-9:
        raise ConfigError(f"factored W~ has margin >= {cert.margin_quantized_lower} < m = {m}: a bug")
    requant = certify_conv(Kt, image, method.bits, method.granularity)
    return deployment(K, Kt, cert, m_construction=m, requantized=requant)
