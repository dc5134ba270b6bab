"""Tests of the training loop: determinism, exact resume, QAT, margin-aware penalty, evaluation."""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SHARED_MNIST, RecordingEstimates
from torch.nn import functional as F

from monquant.data import MNIST, load_mnist
from monquant.errors import MonquantError
from monquant.model import MonDEQClassifier, MonDEQConfig
from monquant.operators import margin
from monquant.quant.uniform import QuantizationError, quantize
from monquant.storage.checkpoints import load_model, save_model
from monquant.training.loop import (
    TrainConfig,
    epoch_generator,
    evaluate,
    install_qat,
    margin_penalty,
    train,
    training_tolerance,
)
from monquant.training.runs import TrainRequest, run_training

TIMING = {"seconds", "eval_seconds"}
HIDDEN = 16


def synthetic_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable 784-pixel 'images': class k lights up its own block of 78 pixels, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = 0.3 * torch.randn(n, 784, generator=g)
    for k in range(10):
        x[y == k, k * 78 : (k + 1) * 78] += 2.0
    return x, y


def synthetic_mnist(n_train: int = 1200, n_test: int = 200) -> MNIST:
    x_train, y_train = synthetic_split(n_train, 1)
    x_test, y_test = synthetic_split(n_test, 2)
    return MNIST(x_train, y_train, x_test, y_test, Path("synthetic"), {"synthetic": "none"})


@pytest.fixture(scope="module")
def data() -> MNIST:
    return synthetic_mnist()


@pytest.fixture(scope="module")
def real_mnist() -> MNIST:
    """The real MNIST (loaded once for this module), or skip when the files are absent."""
    env = os.environ.get("MONQUANT_DATA")
    path = Path(env) if env else SHARED_MNIST
    if not any((path / f"t10k-labels-idx1-ubyte{s}").exists() for s in ("", ".gz")):
        pytest.skip(f"MNIST files not found in {path}")
    return load_mnist(path, download=False)


def new_model(seed: int = 0, hidden: int = HIDDEN, **kw: Any) -> MonDEQClassifier:
    torch.manual_seed(seed)
    return MonDEQClassifier(MonDEQConfig(hidden=hidden, **kw))


def run(model: MonDEQClassifier, data: MNIST, cfg: TrainConfig, **kw: Any) -> list[dict]:
    return train(
        model, data.x_train, data.y_train, data.x_test, data.y_test, cfg, progress=False, **kw
    )


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if k not in TIMING} for entry in history]


def assert_same_history(resumed: list[dict], straight: list[dict]) -> None:
    """Equal except timing; ``train_mean_iterations`` is derived from the solver's running means,
    whose rounding depends on how many solves the (fresh after a resume) counters have seen."""
    key = "train_mean_iterations"
    assert [e[key] for e in resumed] == pytest.approx([e[key] for e in straight], rel=1e-12)
    strip = TIMING | {key}
    assert [{k: v for k, v in e.items() if k not in strip} for e in resumed] == [
        {k: v for k, v in e.items() if k not in strip} for e in straight
    ]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# ----------------------------------------------------------------------------------------------
# Determinism and resume
# ----------------------------------------------------------------------------------------------


def test_epoch_generator_depends_only_on_seed_and_epoch() -> None:
    p = torch.randperm(50, generator=epoch_generator(3, 1))
    assert torch.equal(p, torch.randperm(50, generator=epoch_generator(3, 1)))
    assert not torch.equal(p, torch.randperm(50, generator=epoch_generator(3, 2)))
    assert not torch.equal(p, torch.randperm(50, generator=epoch_generator(4, 1)))


def test_same_seed_gives_bit_identical_runs(data: MNIST) -> None:
    cfg = TrainConfig(epochs=2, batch_size=100, seed=5)
    m1, m2 = new_model(), new_model()
    h1, h2 = run(m1, data, cfg), run(m2, data, cfg)
    assert_same_weights(m1, m2)
    assert without_timing(h1) == without_timing(h2)
    assert len(h1) == 2 and [e["epoch"] for e in h1] == [1, 2]
    assert all(TIMING <= e.keys() for e in h1)
    # the run did something, and a different batch order gives different weights
    assert h1[-1]["train_accuracy"] > 0.3
    m3 = new_model()
    run(m3, data, TrainConfig(epochs=2, batch_size=100, seed=6))
    assert not torch.equal(m1.layer.A, m3.layer.A)


@pytest.mark.parametrize(
    "extra",
    [{}, {"qat_bits": 4, "margin_target": 1.2, "margin_weight": 0.5}, {"train_tol_start": 1e-2}],
    ids=["float", "qat-margin", "tol-schedule"],
)
def test_resume_from_checkpoint_file_equals_uninterrupted(
    data: MNIST, tmp_path: Path, extra: dict
) -> None:
    # decay_epoch=2: the learning rate drops between the interruption and the resumed epoch,
    # so the scheduler state must be restored too
    cfg = TrainConfig(epochs=3, batch_size=150, decay_epoch=2, decay=0.3, seed=1, **extra)
    straight = new_model()
    h_straight = run(straight, data, cfg)

    class StopTrainingError(Exception):
        pass

    path = tmp_path / "ckpt.safetensors"
    interrupted = new_model()

    def checkpoint(state: dict) -> None:
        save_model(path, interrupted, train_state=state)
        if state["epoch"] == 2:
            raise StopTrainingError

    with pytest.raises(StopTrainingError):
        run(interrupted, data, cfg, checkpoint=checkpoint)
    loaded = load_model(path)
    assert loaded.train_state is not None and loaded.train_state["epoch"] == 2
    resumed = loaded.model
    h_resumed = run(resumed, data, cfg, resume_state=loaded.train_state)
    assert_same_weights(straight, resumed)
    assert_same_history(h_resumed, h_straight)


def _echo_interrupting_at(epoch: int):
    def echo(line: str) -> None:
        if line.startswith(f"epoch {epoch:2d}:"):
            raise KeyboardInterrupt

    return echo


def test_run_training_resume_equals_uninterrupted(data: MNIST, tmp_path: Path) -> None:
    base = dict(hidden=HIDDEN, epochs=3, batch_size=150, decay_epoch=2, seed=2, progress=False)
    straight = run_training(TrainRequest.of(tmp_path / "a", **base), data, echo=None)
    # interrupted while logging epoch 3: only the checkpoint after epoch 2 exists
    with pytest.raises(KeyboardInterrupt):
        run_training(TrainRequest.of(tmp_path / "b", **base), data, echo=_echo_interrupting_at(3))
    assert not (tmp_path / "b" / "model.safetensors").exists()
    ckpt = load_model(tmp_path / "b" / "checkpoint.safetensors")
    assert ckpt.train_state is not None and ckpt.train_state["epoch"] == 2
    lines: list[str] = []
    resumed = run_training(
        TrainRequest.of(tmp_path / "b", resume=True, **base), data, echo=lines.append
    )
    assert lines[0].startswith("resuming") and len(lines) == 2  # resume note + epoch 3
    assert_same_weights(load_model(straight["model"]).model, load_model(resumed["model"]).model)
    assert_same_history(resumed["history"], straight["history"])


def test_run_training_resume_refuses_changed_settings_but_may_extend(
    data: MNIST, tmp_path: Path
) -> None:
    """Only --epochs may change on resume (to extend a run); any other change is refused."""
    base = dict(hidden=HIDDEN, epochs=1, batch_size=300, seed=0, progress=False)
    run_training(TrainRequest.of(tmp_path, **base), data, echo=None)
    with pytest.raises(MonquantError, match=r"training settings .*lr"):
        run_training(
            TrainRequest.of(tmp_path, resume=True, **{**base, "lr": 2e-3}), data, echo=None
        )
    with pytest.raises(MonquantError, match=r"model/solver settings .*hidden"):
        run_training(
            TrainRequest.of(tmp_path, resume=True, **{**base, "hidden": HIDDEN + 2}),
            data,
            echo=None,
        )
    extended = run_training(
        TrainRequest.of(tmp_path, resume=True, **{**base, "epochs": 2}), data, echo=None
    )
    assert [h["epoch"] for h in extended["history"]] == [1, 2]


def test_run_training_resume_refuses_changed_model_settings(data: MNIST, tmp_path: Path) -> None:
    base = dict(hidden=HIDDEN, epochs=1, batch_size=300, seed=0, progress=False)
    run_training(TrainRequest.of(tmp_path, **base), data, echo=None)
    with pytest.raises(MonquantError):
        run_training(
            TrainRequest.of(tmp_path, resume=True, **{**base, "hidden": 30}), data, echo=None
        )


def test_run_training_resume_without_checkpoint_starts_fresh(data: MNIST, tmp_path: Path) -> None:
    lines: list[str] = []
    req = TrainRequest.of(tmp_path, hidden=HIDDEN, epochs=1, batch_size=300, resume=True, progress=False
    )
    result = run_training(req, data, echo=lines.append)
    assert "no checkpoint" in lines[0]
    assert len(result["history"]) == 1
    assert Path(result["model"]).is_file() and Path(result["log"]).is_file()


# ----------------------------------------------------------------------------------------------
# QAT
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["per-tensor", "per-channel"])
def test_qat_forward_uses_quantized_weight(granularity: str) -> None:
    model = new_model()
    W = model.layer.weight().detach()
    install_qat(model, 4, granularity)
    Wq = model.layer.effective_weight().detach()
    assert torch.equal(Wq, quantize(W, 4, granularity).dequantized())
    assert not torch.equal(Wq, W)
    # the forward solve sees Q(W): same logits as passing Q(W) explicitly
    x, _ = synthetic_split(8, 3)
    with torch.no_grad():
        assert torch.equal(model(x), model(x, W=Wq))
    install_qat(model, None)
    assert torch.equal(model.layer.effective_weight().detach(), W)


def test_qat_gradients_flow_and_loss_decreases() -> None:
    model = new_model()
    install_qat(model, 4)
    x, y = synthetic_split(64, 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(8):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name in ("A", "B", "m_raw"):
                g = getattr(model.layer, name).grad
                assert g is not None and bool(torch.isfinite(g).all()), name
                assert float(g.abs().max()) > 0, name
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


def test_qat_training_logs_quantized_margin(data: MNIST) -> None:
    model = new_model()
    history = run(model, data, TrainConfig(epochs=1, batch_size=200, qat_bits=4))
    entry = history[0]
    Wq = model.layer.effective_weight().detach()
    assert entry["margin_quantized"] == pytest.approx(margin(Wq), rel=1e-9)
    assert "margin_quantized" not in run(new_model(), data, TrainConfig(epochs=1))[0]


def test_train_config_validation() -> None:
    with pytest.raises(ValueError):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError):
        TrainConfig(lr=0.0)
    with pytest.raises(QuantizationError):
        TrainConfig(qat_bits=1)
    assert TrainConfig(qat_bits=4.0).qat_bits == 4


def test_training_tolerance_schedule_is_geometric_and_ends_at_tol() -> None:
    cfg = TrainConfig(epochs=5, train_tol_start=1e-2)
    tols = [training_tolerance(cfg, 1e-4, e) for e in range(5)]
    assert tols[0] == pytest.approx(1e-2) and tols[-1] == 1e-4
    ratios = [b / a for a, b in itertools.pairwise(tols)]
    assert ratios == pytest.approx([10 ** -0.5] * 4)
    assert training_tolerance(TrainConfig(epochs=5), 1e-4, 0) == 1e-4
    assert training_tolerance(TrainConfig(epochs=1, train_tol_start=1e-2), 1e-4, 0) == 1e-4
    with pytest.raises(MonquantError, match="tighter"):
        training_tolerance(TrainConfig(train_tol_start=1e-6), 1e-4, 0)
    for bad in (0.0, 1.0, -1e-3, math.nan, "1e-2"):
        with pytest.raises(MonquantError, match="train_tol_start"):
            TrainConfig(train_tol_start=bad)


def test_loose_training_solves_leave_evaluation_and_the_model_at_tol(data: MNIST) -> None:
    """Training solves follow the schedule (their residuals are at most the epoch's tolerance and
    fewer iterations than at tol), evaluation solves and the trained model keep the full tol."""
    model = new_model(solver={"method": "pr", "tol": 1e-5})
    seen: list[tuple[bool, float, float]] = []
    solve = model.solver.__class__.__call__

    def spy(self, W, q, **kw):  # record (training?, tolerance, max residual) of every forward solve
        z = solve(self, W, q, **kw)
        seen.append((model.training, self.forward_config.tol, float(self.last_forward.residual.max())))
        return z

    cfg = TrainConfig(epochs=3, batch_size=200, train_tol_start=1e-2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model.solver.__class__, "__call__", spy)
        history = run(model, data, cfg)
    mid = (1e-2 * 1e-5) ** 0.5
    assert [e["train_tol"] for e in history] == pytest.approx([1e-2, mid, 1e-5])
    train_tols = sorted({t for training, t, _ in seen if training})
    assert train_tols == pytest.approx([1e-5, mid, 1e-2])
    assert {t for training, t, _ in seen if not training} == {1e-5}
    assert all(res <= t for _, t, res in seen), max(res / t for _, t, res in seen)
    assert model.solver.forward_config.tol == 1e-5  # restored after training
    assert all(e["train_unconverged"] == 0 and e["test_unconverged"] == 0 for e in history)


@pytest.mark.parametrize("fast", [True, False])
def test_training_solves_take_the_geometric_step_and_evaluation_the_models_own(
    data: MNIST, fast: bool
) -> None:
    """With ``fast_spectral`` the training solves (forward and adjoint) step at 1/sqrt(m L) from
    estimates (no modulus), evaluation solves at the model's own 1/L with exact constants; without
    it every solve keeps the model's policy. The model's settings are restored after training."""
    model = new_model(solver={"method": "pr", "tol": 1e-5})
    seen: list[tuple[bool, str, float, float, bool]] = []
    solve = model.solver.__class__.__call__

    def spy(self, W, q, **kw):
        z = solve(self, W, q, **kw)
        r = self.last_forward
        seen.append((model.training, self.forward_config.step_policy, r.step, r.stats.L, r.stats.exact))
        return z

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model.solver.__class__, "__call__", spy)
        history = run(model, data, TrainConfig(epochs=1, batch_size=200, fast_spectral=fast))
    training = [s for s in seen if s[0]]
    evaluation = [s for s in seen if not s[0]]
    assert training and evaluation
    assert {s[1] for s in training} == {"geometric" if fast else "bound"}
    assert all(s[4] is not fast for s in training)  # estimated constants only in fast mode
    if fast:  # a step above 1/L (m < L), where bound would have taken 1/L
        assert all(step > 1.0 / L for _, _, step, L, _ in training)
    assert all(p == "bound" and exact and step == pytest.approx(1.0 / L)
               for _, p, step, L, exact in evaluation)  # fmt: skip
    assert model.solver.forward_config.step_policy == "bound"
    assert model.solver.forward_config.spectral == "exact"
    assert history[-1]["train_unconverged"] == 0 and history[-1]["backward_unconverged"] == 0


def test_train_tol_start_is_checked_before_data_loads(tmp_path: Path) -> None:
    with pytest.raises(MonquantError, match="tighter"):
        TrainRequest.of(tmp_path, solver={"method": "pr", "tol": 1e-3}, train_tol_start=1e-4)
    req = TrainRequest.of(tmp_path, solver={"method": "pr", "tol": 1e-4}, train_tol_start=1e-2)
    assert req.train.train_tol_start == 1e-2


# ----------------------------------------------------------------------------------------------
# Margin-aware penalty
# ----------------------------------------------------------------------------------------------


def _exact_margin(model: MonDEQClassifier) -> float:
    return margin(model.layer.effective_weight().detach())


def test_margin_penalty_none_without_target() -> None:
    assert margin_penalty(new_model(), TrainConfig()) is None


@pytest.mark.parametrize("bits", [None, 4])
def test_margin_penalty_below_target(bits: int | None) -> None:
    model = new_model(margin_init=0.2)
    install_qat(model, bits)
    m = _exact_margin(model)
    cfg = TrainConfig(margin_target=m + 0.5, margin_weight=2.0)
    pen = margin_penalty(model, cfg)
    assert pen is not None
    assert float(pen.detach()) == pytest.approx(2.0 * 0.5, rel=1e-4)
    pen.backward()
    layer = model.layer
    assert float(layer.A.grad.abs().max()) > 0
    assert float(layer.m_raw.grad) < 0  # raising m raises the margin and lowers the penalty
    # sym(B - B^T) = 0: the margin of the WK form does not depend on B (nor does STE change it)
    assert layer.B.grad is None or float(layer.B.grad.abs().max()) < 1e-6


def test_margin_penalty_zero_above_target() -> None:
    model = new_model(margin_init=1.0)
    cfg = TrainConfig(margin_target=_exact_margin(model) - 0.3)
    pen = margin_penalty(model, cfg)
    assert pen is not None and float(pen.detach()) == 0.0
    pen.backward()
    assert float(model.layer.A.grad.abs().max()) == 0.0
    assert float(model.layer.m_raw.grad.abs()) == 0.0


def test_margin_penalty_steps_raise_quantized_margin() -> None:
    model = new_model(margin_init=0.1)
    install_qat(model, 4)
    before = _exact_margin(model)
    cfg = TrainConfig(margin_target=before + 1.0)
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    for _ in range(10):
        pen = margin_penalty(model, cfg)
        assert pen is not None
        opt.zero_grad()
        pen.backward()
        opt.step()
    assert _exact_margin(model) > before + 0.2


# ----------------------------------------------------------------------------------------------
# evaluate()
# ----------------------------------------------------------------------------------------------


def test_evaluate_counts_and_batches(data: MNIST) -> None:
    model = new_model().eval()
    x, y = data.x_test[:150], data.y_test[:150]
    full = evaluate(model, x, y, batch_size=1000)
    split = evaluate(model, x, y, batch_size=40)
    assert full.samples == split.samples == 150
    assert full.converged == 150 and full.unconverged == 0 and full.diverged == 0
    assert split.accuracy == full.accuracy
    with torch.no_grad():
        expect = float((model(x).argmax(1) == y).double().mean())
    assert full.accuracy == pytest.approx(expect)
    d = full.as_dict()
    assert d["converged_fraction"] == 1.0 and d["samples"] == 150


def test_evaluate_reports_unconverged_solves(data: MNIST) -> None:
    model = new_model().eval()
    model.solver.forward_config.max_iter = 1
    model.solver.forward_config.tol = 1e-12
    res = evaluate(model, data.x_test[:60], data.y_test[:60], batch_size=25)
    assert res.samples == 60
    assert res.unconverged == 60 and res.converged == 0
    assert res.max_iterations == 1
    assert res.converged_fraction == 0.0
    assert math.isfinite(res.loss)  # a prediction is still made


def test_evaluate_non_finite_logits_count_as_wrong(data: MNIST) -> None:
    model = new_model().eval()
    x = data.x_test[:30]
    with torch.no_grad():
        model.head.weight.fill_(math.nan)
        pred = model(x).argmax(1)
    # labels equal to whatever argmax picks from the NaN logits: still all wrong
    res = evaluate(model, x, pred.clone())
    assert res.accuracy == 0.0
    assert math.isnan(res.loss)


def test_evaluate_diverged_operator(data: MNIST) -> None:
    model = new_model().eval()
    W = 3.0 * torch.eye(HIDDEN)  # I + (1/L)(I - W) = 0: the PR resolvent does not exist
    res = evaluate(model, data.x_test[:20], data.y_test[:20], W=W)
    assert res.diverged == 20 and res.unconverged == 20
    assert res.accuracy == 0.0


# ----------------------------------------------------------------------------------------------
# Real MNIST (skipped without the files)
# ----------------------------------------------------------------------------------------------


def test_short_training_on_real_mnist_learns(real_mnist: MNIST) -> None:
    sub = MNIST(
        real_mnist.x_train[:2000],
        real_mnist.y_train[:2000],
        real_mnist.x_test[:500],
        real_mnist.y_test[:500],
        real_mnist.source,
        real_mnist.md5,
    )
    model = new_model(hidden=24)
    history = run(model, sub, TrainConfig(epochs=2, batch_size=64, lr=3e-3))
    last = history[-1]
    assert last["test_accuracy"] > 0.75
    assert last["train_unconverged"] == 0 and last["test_unconverged"] == 0
    assert last["m"] >= last["m_param"] - 1e-6  # margin(W) >= m by construction


def test_non_finite_loss_stops_training_with_a_clear_error(data: MNIST) -> None:
    from monquant.training.loop import TrainingDivergedError

    model = new_model()
    with torch.no_grad():
        model.head.weight.fill_(float("inf"))
    with pytest.raises(TrainingDivergedError, match="diverged at epoch 1, batch 1"):
        run(model, data, TrainConfig(epochs=1, batch_size=300))
    assert model.solver.forward_config.spectral == "exact"  # restored despite the error


def test_train_keeps_a_caller_installed_weight_transform(data: MNIST) -> None:
    model = new_model()
    seen = []
    model.layer.weight_transform = lambda W: (seen.append(1), W)[1]
    run(model, data, TrainConfig(epochs=1, batch_size=600))
    assert seen and model.layer.weight_transform is not None


def test_qat_can_quantize_U_and_b_too() -> None:
    from monquant.errors import ConfigError
    from monquant.model import MonDEQClassifier, MonDEQConfig
    from monquant.quant.uniform import quantize
    from monquant.training.loop import TrainConfig, install_qat

    torch.manual_seed(0)
    model = MonDEQClassifier(MonDEQConfig(in_features=6, hidden=5, out_features=3)).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    install_qat(model, 3, "per-channel", ("W", "U", "b"))
    layer = model.layer
    Uq = quantize(layer.U.weight.detach(), 3, "per-channel").dequantized()
    bq = quantize(layer.U.bias.detach(), 3, "per-tensor").dequantized()
    assert torch.allclose(layer.injection(x), x @ Uq.T + bq, atol=1e-12)
    assert torch.equal(layer.effective_weight(), quantize(layer.weight().detach(), 3,
                                                          "per-channel").dequantized())  # fmt: skip
    install_qat(model, None)
    assert layer.weight_transform is None
    with pytest.raises(ConfigError, match="qat_parts"):
        TrainConfig(qat_bits=4, qat_parts=["W", "C"])


def test_train_accepts_any_torch_optimizer_and_scheduler(data: MNIST) -> None:
    """A torch.optim optimizer (instance or factory) and LR scheduler drive the same loop."""
    torch.manual_seed(0)
    model = MonDEQClassifier(MonDEQConfig(hidden=HIDDEN))
    cfg = TrainConfig(epochs=2, batch_size=64)
    x, y = data.x_train[:256], data.y_train[:256]
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    states = []
    hist = train(model, x, y, data.x_test[:64], data.y_test[:64], cfg, progress=False,
                 optimizer=opt, scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.5),
                 checkpoint=states.append)  # fmt: skip
    assert len(hist) == 2 and opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert states[-1]["scheduler"]["last_epoch"] == 2
    assert hist[-1]["loss"] < hist[0]["loss"] * 1.5  # it trains (and stays finite)
    model2 = MonDEQClassifier(MonDEQConfig(hidden=HIDDEN))
    hist2 = train(model2, x, y, data.x_test[:64], data.y_test[:64], TrainConfig(epochs=1),
                  progress=False, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))  # fmt: skip
    assert math.isfinite(hist2[0]["loss"])


def test_finite_params_finds_nan_and_inf_and_survives_overflow():
    from monquant.training.loop import _finite_params

    ok = [torch.ones(3, 4), torch.zeros(2)]
    assert _finite_params(ok)
    assert not _finite_params([*ok, torch.tensor([1.0, math.nan])])
    assert not _finite_params([*ok, torch.tensor([-math.inf])])
    big = torch.full((4,), 3e38)  # finite entries whose norm overflows float32: entrywise fallback
    assert _finite_params([*ok, big])


def test_install_qat_on_a_multitier_model_quantizes_its_composite_kernels_only():
    from monquant.errors import ConfigError
    from monquant.multitier_model import MultiTierMonDEQClassifier, MultiTierMonDEQConfig
    from monquant.training.loop import install_qat

    model = MultiTierMonDEQClassifier(MultiTierMonDEQConfig(tier_channels=(1, 2), image=(12, 12)))
    with pytest.raises(ConfigError, match=r"composite kernels\) only, got \['W', 'U'\]"):
        install_qat(model, 4, parts=("W", "U"))
    install_qat(model, 4, "per-channel")
    assert model.layer.weight_transform is not None
    op = model.layer.used_operator()  # every composite kernel on its own 4-bit grid
    assert all(len(torch.unique(K[0].detach())) <= 16 for K in op.kernels())


@pytest.mark.parametrize("kind", ["dense", "conv", "multitier"])
def test_the_float_operator_caps_the_step_of_qat_training_solves(kind: str) -> None:
    """Under STE QAT the float operator's estimated constants cap the training solves' step (the
    fake-quantized operator's margin, and so its own step's denominator, the rounding can take to
    0); the solve itself is of the quantized operator, and gradients still reach every parameter."""
    from monquant.conv_model import ConvMonDEQClassifier, ConvMonDEQConfig
    from monquant.multitier_model import MultiTierMonDEQClassifier, MultiTierMonDEQConfig
    from monquant.operators import (
        CircularConvOperator,
        ConvWKOperator,
        MultiTierConvOperator,
        MultiTierWKOperator,
    )
    from monquant.solvers import StepEstimates, get_solver, solver_step
    from monquant.training.loop import training_solver_config

    torch.manual_seed(0)
    if kind == "dense":
        model: Any = new_model()
        x = torch.randn(4, 784)
    elif kind == "conv":
        model = ConvMonDEQClassifier(ConvMonDEQConfig(image=(8, 8), channels=3, pool=2))
        x = torch.randn(4, 64)
    else:
        model = MultiTierMonDEQClassifier(MultiTierMonDEQConfig(tier_channels=(1, 2), image=(12, 12)))
        x = torch.randn(4, 1, 12, 12)
    solver = model.solver
    install_qat(model, 4)
    own, rec = RecordingEstimates(solver.estimates), RecordingEstimates(solver.reference_estimates)
    solver.estimates, solver.reference_estimates = own, rec
    with solver.configured(training_solver_config(TrainConfig(), solver.forward_config, 0)):
        model(x).square().sum().backward()
    assert len(rec.seen) == len(own.seen) == 1
    ref, solved = rec.seen[0], own.seen[0]
    steps = []
    for op in (ref, solved):  # a cold estimate repeats the solver's first one exactly
        st = StepEstimates()(op)
        steps.append(solver_step(get_solver("pr"), "geometric", st.m, st.L))
    assert solver.last_forward.step == solver.last_backward.step == min(steps)
    if kind == "dense":
        assert torch.equal(ref, model.layer.weight().detach())
        assert torch.equal(solved, model.layer.effective_weight().detach())
        z, q = solver.last_forward.z, model.layer.injection(x).detach()
        assert torch.allclose(z, torch.relu(z @ solved.T + q), atol=1e-3)  # the equilibrium of W~
        assert not torch.allclose(z, torch.relu(z @ ref.T + q), atol=1e-3)  # not of W
    elif kind == "conv":
        assert isinstance(ref, ConvWKOperator) and isinstance(solved, CircularConvOperator)
    else:
        assert isinstance(ref, MultiTierWKOperator) and isinstance(solved, MultiTierConvOperator)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
