"""``monquant import``: checkpoints of the paper's code and of the original MonDEQ code (issue 17).

Fixtures are built in both layouts with ``torch.save`` of plain tensors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from monquant.cli import main
from monquant.errors import CheckpointError
from monquant.storage.checkpoints import load_model
from monquant.storage.foreign import import_checkpoint, to_state_dict


def paper_state(n: int = 12, r: int = 4, d: int = 20, k: int = 10, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "mon.core.A": 0.3 * torch.randn(r, n, generator=g),
        "mon.core.S": 0.3 * torch.randn(n, n, generator=g),
        "mon.core.m_raw": torch.tensor(-1.2),
        "mon.core.U": 0.1 * torch.randn(n, d, generator=g),
        "mon.core.b": 0.1 * torch.randn(n, generator=g),
        "classifier.weight": torch.randn(k, n, generator=g),
        "classifier.bias": torch.randn(k, generator=g),
    }


def mon_state(n: int = 9, d: int = 20, prefix: str = "mon.linear_module.", head: bool = True):
    g = torch.Generator().manual_seed(1)
    sd = {
        f"{prefix}U.weight": 0.1 * torch.randn(n, d, generator=g),
        f"{prefix}U.bias": 0.1 * torch.randn(n, generator=g),
        f"{prefix}A.weight": 0.3 * torch.randn(n, n, generator=g),
        f"{prefix}B.weight": 0.3 * torch.randn(n, n, generator=g),
    }
    if head:
        sd |= {"Wout.weight": torch.randn(10, n, generator=g), "Wout.bias": torch.randn(10, generator=g)}
    return sd


def _save(tmp: Path, name: str, obj) -> Path:
    path = tmp / name
    torch.save(obj, path)
    return path


def test_paper_layout_gives_the_papers_W_and_head(tmp_path: Path) -> None:
    sd = paper_state()
    im = import_checkpoint("mondeq-quant", _save(tmp_path, "p.pt", sd))
    A, S = sd["mon.core.A"], sd["mon.core.S"]
    m = F.softplus(sd["mon.core.m_raw"]) + 1e-4
    W = (1 - m) * torch.eye(12) - A.T @ A + S - S.T  # the paper's formula, in its float32
    assert torch.allclose(im.model.layer.weight(), W, rtol=0, atol=1e-6)
    assert im.model.config.rank == 4 and im.model.config.margin_floor == 1e-4
    x = torch.randn(3, 20)
    q = im.model.layer.injection(x)
    assert torch.allclose(q, x @ sd["mon.core.U"].T + sd["mon.core.b"], atol=1e-6)
    assert torch.equal(im.model.head.weight, sd["classifier.weight"])


@pytest.mark.parametrize("layout", ["mondeq-quant", "monotone-op-net"])
def test_round_trip_is_bit_exact(tmp_path: Path, layout: str) -> None:
    sd = paper_state() if layout == "mondeq-quant" else mon_state()
    im = import_checkpoint(layout, _save(tmp_path, "a.pt", sd))
    back = to_state_dict(im.model, layout)
    assert back.keys() == sd.keys()
    for key in sd:
        assert torch.equal(back[key], sd[key]), key
    again = import_checkpoint(layout, _save(tmp_path, "b.pt", back))
    assert torch.equal(again.model.layer.weight(), im.model.layer.weight())


def test_monotone_op_net_layout_uses_the_given_margin(tmp_path: Path) -> None:
    sd = mon_state()
    for m in (1.0, 0.1):
        im = import_checkpoint("monotone-op-net", _save(tmp_path, "m.pt", sd), margin=m)
        A, B = sd["mon.linear_module.A.weight"], sd["mon.linear_module.B.weight"]
        W = (1 - m) * torch.eye(9) - A.T @ A + B - B.T
        assert torch.allclose(im.model.layer.weight(), W, rtol=0, atol=1e-6)
        assert abs(float(im.model.layer.margin()) - m) < 1e-6
        assert not im.model.config.learn_margin
    bare = import_checkpoint("monotone-op-net", _save(tmp_path, "bare.pt", mon_state(prefix="", head=False)))
    assert any("no output layer" in n for n in bare.notes)
    assert float(bare.model.head.weight.detach().abs().sum()) == 0.0


class Opaque(torch.nn.Module):  # a whole pickled module needs a global: refused
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.eye(3))


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: Opaque(), "weights_only=True"),
        (lambda: {k: v for k, v in paper_state().items() if k != "mon.core.S"}, "missing key 'mon.core.S'"),
        (lambda: paper_state() | {"mon.core.extra": torch.zeros(1)}, "unknown keys"),
        (lambda: paper_state() | {"mon.core.b": torch.zeros(5)}, "mon.core.b has shape"),
        (lambda: paper_state() | {"mon.core.U": torch.full((12, 20), float("nan"))}, "non-finite"),
        (lambda: mon_state(), "not the mondeq-quant layout"),
        (lambda: [torch.zeros(2)], "expected a state dict"),
    ],
)
def test_bad_sources_are_named(tmp_path: Path, make, fragment: str) -> None:
    path = _save(tmp_path, "bad.pt", make())
    with pytest.raises(CheckpointError, match="^" + str(path).replace(".", r"\.")) as info:
        import_checkpoint("mondeq-quant", path)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)  # one line


def test_cli_import_then_certify_and_every_command_accepts_it(tmp_path: Path, capsys) -> None:
    src = _save(tmp_path, "paper.pt", paper_state(n=16, r=4, d=784))
    out = tmp_path / "paper.safetensors"
    assert main(["import", "mondeq-quant", str(src), "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    loaded = load_model(out)
    assert loaded.metadata["imported_from"]["layout"] == "mondeq-quant"
    assert info["m"] == pytest.approx(float(loaded.model.layer.margin().detach()), rel=1e-6)
    assert info["rank"] == 4
    assert main(["certify", str(out), "--bits", "4", "8", "--json"]) == 0
    certs = json.loads(capsys.readouterr().out)
    assert [c["bits"] for c in certs] == [4, 8] and certs[0]["n"] == 16


def test_cli_import_refuses_a_pickle_with_one_error_line(tmp_path: Path) -> None:
    src = _save(tmp_path, "model.pt", Opaque())
    proc = subprocess.run(
        [sys.executable, "-m", "monquant", "import", "mondeq-quant", str(src), "--out",
         str(tmp_path / "x.safetensors")], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("monquant import: error: ") and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_an_imported_model_goes_through_ptq_eval_and_export(tmp_path: Path, tiny_mnist, capsys) -> None:
    data = tiny_mnist(tmp_path / "mnist", 200, 100)
    src = _save(tmp_path, "paper.pt", paper_state(n=16, r=4, d=784))
    model = tmp_path / "paper.safetensors"
    common = ["--data-dir", str(data), "--no-download", "--no-progress"]
    assert main(["import", "mondeq-quant", str(src), "--out", str(model)]) == 0
    rc = main(["ptq", str(model), "--bits", "8", "--out", str(tmp_path / "q.safetensors"), *common])
    assert rc == 0
    assert main(["eval", str(tmp_path / "q.safetensors"), "--allow-unconverged", *common]) == 0
    rc = main(["export", str(model), "--bits", "8", "--calibration-limit", "50",
               "--out", str(tmp_path / "d.safetensors"), *common])  # fmt: skip
    assert rc == 0 and (tmp_path / "d.safetensors").exists()
    capsys.readouterr()
