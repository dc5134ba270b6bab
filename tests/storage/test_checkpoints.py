"""Tests of model checkpoints: roundtrips (float, training state, quantized), refused files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from monquant.errors import CheckpointError
from monquant.model import MonDEQClassifier, MonDEQConfig
from monquant.storage.checkpoints import (
    CHECKPOINT_FORMAT,
    load_model,
    quantize_model,
    save_model,
)
from monquant.storage.tensors import load_tensors, save_tensors
from monquant.training.loop import TrainConfig, train
from monquant.training.optim import Adam

HIDDEN = 20


def new_model(seed: int = 0, **kw) -> MonDEQClassifier:
    torch.manual_seed(seed)
    return MonDEQClassifier(MonDEQConfig(hidden=HIDDEN, **kw)).eval()


def batch(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 784, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained() -> tuple[MonDEQClassifier, dict]:
    """A model after one short epoch and the training state handed to the checkpoint callback."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 784, generator=g), torch.randint(0, 10, (300,), generator=g)
    model = new_model(rank=10)
    states: list[dict] = []
    train(
        model,
        x,
        y,
        x[:50],
        y[:50],
        TrainConfig(epochs=1, batch_size=100),
        progress=False,
        checkpoint=states.append,
    )
    return model.eval(), states[-1]


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, MonDEQClassifier]:
    model = new_model()
    return save_model(tmp_path / "m.safetensors", model), model


def header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


# ----------------------------------------------------------------------------------------------
# Roundtrips
# ----------------------------------------------------------------------------------------------


def test_float_roundtrip_same_outputs(saved: tuple[Path, MonDEQClassifier]) -> None:
    path, model = saved
    loaded = load_model(path)
    assert loaded.train_state is None and loaded.quantized is None
    assert loaded.model.config == model.config
    meta = loaded.metadata
    assert meta["kind"] == "monquant-model" and meta["format"] == CHECKPOINT_FORMAT
    assert {"monquant", "torch"} <= meta["versions"].keys()
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], t), name
    x = batch()
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x), model(x))


def test_config_variants_roundtrip(tmp_path: Path) -> None:
    model = new_model(
        rank=5,
        learn_margin=False,
        margin_init=0.3,
        backward="direct",
        solver={"method": "dr", "tol": 1e-6, "max_iter": 300, "step": 0.5},
    )
    loaded = load_model(save_model(tmp_path / "v.safetensors", model)).model
    assert loaded.config == model.config
    assert loaded.layer.A.shape == (5, HIDDEN)
    assert "layer.m_raw" not in dict(loaded.named_parameters())  # a buffer, not learned
    assert torch.equal(loaded.state_dict()["layer.m_raw"], model.state_dict()["layer.m_raw"])
    assert loaded.solver.forward_config.method == "dr"
    assert loaded.solver.forward_config.max_iter == 300
    assert loaded.solver.backward == "direct"
    x = batch(4)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


def test_train_state_roundtrip(trained: tuple[MonDEQClassifier, dict], tmp_path: Path) -> None:
    model, state = trained
    path = save_model(tmp_path / "ckpt.safetensors", model, train_state=state, extra={"note": 1})
    loaded = load_model(path)
    assert loaded.metadata["note"] == 1
    ts = loaded.train_state
    assert ts is not None
    assert ts["epoch"] == state["epoch"] == 1
    assert ts["scheduler"] == json.loads(json.dumps(state["scheduler"]))
    assert ts["history"] == json.loads(json.dumps(state["history"]))
    orig, back = state["optimizer"], ts["optimizer"]
    assert orig["state"].keys() == back["state"].keys()
    for idx, st in orig["state"].items():
        assert st.keys() == back["state"][idx].keys()
        for key, val in st.items():
            got = back["state"][idx][key]
            assert got.dtype == val.dtype and torch.equal(got, val), (idx, key)
    assert back["param_groups"] == json.loads(json.dumps(orig["param_groups"]))
    # the restored state loads into a fresh Adam, and the next step is identical
    steps = []
    for m, opt_state in ((model, orig), (loaded.model, back)):
        m = MonDEQClassifier(m.config)
        m.load_state_dict(model.state_dict())
        opt = Adam(m.parameters(), lr=1e-3)
        opt.load_state_dict(opt_state)
        for p in m.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        steps.append(m.state_dict())
    for name in steps[0]:
        assert torch.equal(steps[0][name], steps[1][name]), name


@pytest.mark.parametrize(
    ("bits", "granularity", "parts", "code_dtype"),
    [
        (4, "per-tensor", ("W",), torch.int8),
        (6, "per-channel", ("W", "U", "b"), torch.int8),
        (12, "per-channel", ("W", "b"), torch.int16),
    ],
)
def test_quantized_roundtrip(
    tmp_path: Path, bits: int, granularity: str, parts: tuple, code_dtype: torch.dtype
) -> None:
    model = new_model()
    qw = quantize_model(model, bits, granularity, parts)
    path = save_model(tmp_path / "q.safetensors", model, quantized=qw)
    loaded = load_model(path)
    lq = loaded.quantized
    assert lq is not None
    assert (lq.bits, lq.granularity) == (bits, granularity)
    assert sorted(lq.parts) == sorted(parts)
    for name, q in qw.parts.items():
        got = lq.parts[name]
        assert got.codes.dtype == code_dtype
        assert torch.equal(got.codes, q.codes), name
        assert torch.equal(got.step, q.step) and torch.equal(got.w_max, q.w_max), name
        assert got.granularity == q.granularity and got.dtype == q.dtype
        assert torch.equal(got.dequantized(), q.dequantized())
    assert lq.parts.get("b") is None or lq.parts["b"].granularity == "per-tensor"
    x = batch(8)
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x, **lq.overrides()), model(x, **qw.overrides()))


def test_quantize_model_rejects_unknown_parts() -> None:
    with pytest.raises(ValueError, match="W, U and b"):
        quantize_model(new_model(), 4, parts=("W", "C"))
    with pytest.raises(ValueError):
        quantize_model(new_model(), 4, parts=())


# ----------------------------------------------------------------------------------------------
# Damaged, foreign and future files
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", ["prefix", "header", "payload"])
def test_truncated_file_raises(saved: tuple[Path, MonDEQClassifier], keep: str) -> None:
    path, _ = saved
    raw = path.read_bytes()
    n = header_length(path)
    cut = {"prefix": 5, "header": 8 + n // 2, "payload": len(raw) - 7}[keep]
    path.write_bytes(raw[:cut])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(path)


def test_tampered_payload_raises(saved: tuple[Path, MonDEQClassifier]) -> None:
    path, _ = saved
    raw = bytearray(path.read_bytes())
    raw[8 + header_length(path) + 3] ^= 0x01  # a low mantissa bit of the first tensor
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="digest mismatch") as info:
        load_model(path)
    assert "tampered" in str(info.value) and str(path) in str(info.value)


def test_tampered_metadata_raises(saved: tuple[Path, MonDEQClassifier]) -> None:
    path, _ = saved
    raw = path.read_bytes()
    old = b'\\"margin_init\\": 1.0'
    assert raw.count(old) == 1
    path.write_bytes(raw.replace(old, b'\\"margin_init\\": 2.0'))
    with pytest.raises(CheckpointError, match="digest mismatch"):
        load_model(path)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "absent.safetensors")


def test_plain_safetensors_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"W": torch.eye(4)}, str(path))
    with pytest.raises(CheckpointError, match="not a monquant"):
        load_model(path)


def test_plain_safetensors_message_points_at_certify(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"W": torch.eye(4)}, str(path))
    with pytest.raises(CheckpointError, match="certify"):
        load_model(path)


def test_monquant_tensor_file_that_is_not_a_model_refused(tmp_path: Path) -> None:
    path = save_tensors(tmp_path / "w.safetensors", {"W": torch.eye(4)}, {"kind": "weights"})
    with pytest.raises(CheckpointError, match="not a monquant model checkpoint") as info:
        load_model(path)
    assert "certify" in str(info.value)


def _rewrite(src: Path, dest: Path, edit) -> Path:
    tensors, meta = load_tensors(src)
    edit(tensors, meta)
    return save_tensors(dest, tensors, meta)


def test_unknown_config_key_from_newer_writer_loads(
    saved: tuple[Path, MonDEQClassifier], tmp_path: Path
) -> None:
    path, model = saved

    def edit(tensors, meta):
        meta["config"]["future_option"] = {"enabled": True}
        meta["something_new"] = [1, 2, 3]

    newer = _rewrite(path, tmp_path / "newer.safetensors", edit)
    loaded = load_model(newer)
    assert loaded.model.config == model.config
    assert loaded.metadata["config"]["future_option"] == {"enabled": True}
    x = batch(4)
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x), model(x))


def test_newer_format_refused(saved: tuple[Path, MonDEQClassifier], tmp_path: Path) -> None:
    path, _ = saved

    def edit(tensors, meta):
        meta["format"] = CHECKPOINT_FORMAT + 1

    with pytest.raises(CheckpointError, match="newer"):
        load_model(_rewrite(path, tmp_path / "future.safetensors", edit))


def test_invalid_config_refused(saved: tuple[Path, MonDEQClassifier], tmp_path: Path) -> None:
    path, _ = saved

    def edit(tensors, meta):
        meta["config"]["hidden"] = 0

    with pytest.raises(CheckpointError, match="invalid model config"):
        load_model(_rewrite(path, tmp_path / "bad.safetensors", edit))


def test_tensors_not_matching_config_refused(
    saved: tuple[Path, MonDEQClassifier], tmp_path: Path
) -> None:
    path, _ = saved

    def edit(tensors, meta):
        meta["config"]["hidden"] = HIDDEN + 1

    with pytest.raises(CheckpointError, match="do not match"):
        load_model(_rewrite(path, tmp_path / "mismatch.safetensors", edit))


def test_non_finite_weights_refused(tmp_path: Path) -> None:
    model = new_model()
    with torch.no_grad():
        model.layer.B[0, 0] = float("nan")
    path = save_model(tmp_path / "nan.safetensors", model)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_model(path)


def test_save_is_atomic_and_overwrites(saved: tuple[Path, MonDEQClassifier]) -> None:
    path, _ = saved
    other = new_model(seed=7)
    save_model(path, other)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left over
    loaded = load_model(path).model
    assert torch.equal(loaded.layer.A, other.layer.A)


def test_frozen_format1_checkpoint_still_loads() -> None:
    """A checkpoint written by monquant 0.1.0 (format 1) loads and computes the same outputs."""
    fixture = Path(__file__).parents[1] / "data" / "checkpoint-format1-v0.1.0.safetensors"
    loaded = load_model(fixture)
    assert loaded.metadata["format"] == 1 and loaded.metadata["versions"]["monquant"] == "0.1.0"
    x = torch.linspace(-1, 1, 784, dtype=torch.float32).reshape(1, 784)
    expected_float = [0.0406489372253418, 0.36768344044685364, -0.05073026567697525]
    expected_quant = [0.04640796780586243, 0.3632296323776245, -0.049038976430892944]
    with torch.no_grad():
        out = loaded.model(x)[0, :3].tolist()
        outq = loaded.model(x, **loaded.quantized.overrides())[0, :3].tolist()
    assert out == pytest.approx(expected_float, abs=1e-4)
    assert outq == pytest.approx(expected_quant, abs=1e-4)
    assert loaded.quantized.bits == 4 and loaded.quantized.parts["W"].codes.dtype == torch.int8


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda t, m: t.pop("quant.W.step"), "lacks quant.W.step"),
        (lambda t, m: m["quantization"].update(bits="abc"), "invalid quantization metadata"),
        (lambda t, m: t["quant.W.codes"].view(-1).__setitem__(0, -128), "outside the symmetric"),
        (lambda t, m: m["quantization"].pop("parts"), "invalid quantization metadata"),
    ],
)
def test_broken_quantized_checkpoints_are_refused_by_name(tmp_path: Path, edit, fragment) -> None:
    from monquant.storage.checkpoints import quantize_model

    model = MonDEQClassifier(MonDEQConfig(in_features=6, hidden=5, out_features=3))
    qw = quantize_model(model, 8, "per-tensor", ("W",))
    good = save_model(tmp_path / "q.safetensors", model, quantized=qw)
    tensors, meta = load_tensors(good)
    tensors = {k: v.clone() for k, v in tensors.items()}
    edit(tensors, meta)
    bad = save_tensors(tmp_path / "bad.safetensors", tensors, meta)  # validly signed, wrong inside
    with pytest.raises(CheckpointError, match=fragment):
        load_model(bad)


def test_the_step_rule_survives_save_and_load(tmp_path: Path) -> None:
    model = new_model()
    qw = quantize_model(model, 4, "per-channel", ("W", "U"), step_rule="narrow")
    path = save_model(tmp_path / "q.safetensors", model, quantized=qw)
    back = load_model(path).quantized
    assert back is not None and back.step_rule == "narrow"
    assert all(q.step_rule == "narrow" for q in back.parts.values())
    assert torch.equal(back.tensor("W"), qw.tensor("W"))
    paper = quantize_model(model, 4, "per-channel", ("W",))
    assert not torch.equal(paper.tensor("W"), qw.tensor("W"))  # the rules differ
