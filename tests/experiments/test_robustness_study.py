"""`monquant robustness`: the study on a tiny model, its invariants, report, resume and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monquant.cli import main
from monquant.errors import ConfigError
from monquant.experiments.robustness.study import RobustnessConfig, check_rows, config_specs

EPS = ("0.1", "0.5", "2")


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_mnist):
    tmp = tmp_path_factory.mktemp("robustness")
    data = tiny_mnist(tmp / "mnist", 400, 120)
    common = ["--data-dir", str(data), "--no-download", "--no-progress"]
    assert main(["train", "--out", str(tmp / "run"), "--hidden", "16", "--epochs", "2",
                 "--margin-init", "1.0", *common]) == 0  # fmt: skip
    ckpt = tmp / "run" / "model.safetensors"
    out = tmp / "out"
    argv = ["robustness", str(ckpt), "--quick", "--out", str(out), "--bits", "4", "8",
            "--granularities", "per-tensor", "per-channel", "--methods", "ptq", "ste", "margin",
            "--robust-eps", "0.5", "--eps", *EPS, "--train-limit", "300", "--json", *common]  # fmt: skip
    return argv, out


def _run(argv, capsys):
    capsys.readouterr()
    rc = main(argv)
    return rc, json.loads(capsys.readouterr().out)


def test_every_configuration_is_a_row_and_no_certificate_is_contradicted(study, capsys) -> None:
    argv, _ = study
    rc, res = _run(argv, capsys)
    assert rc == 0 and res["contradictions"] == []
    rows = res["rows"]
    names = [r["name"] for r in rows]
    assert names[0] == "float"
    assert "ptq/per-channel/W8" in names and "margin+lm0.5/per-tensor/W4" in names
    assert len(rows) == 1 + 4 + 2 * 2 + 2  # float, PTQ 2x2, two trained kinds x 2, +lm x 2
    for r in rows:
        assert r["status"] == "ok" and r["certified_but_disagreeing"] == 0
        if r["kind"] != "float":
            assert r["certified_agreement_rate"] <= r["measured_agreement_rate"]
            assert r["certified_agreement_rate_theorem3"] <= r["certified_agreement_rate"]
        pgd = r["pgd"]
        for e in EPS:
            assert pgd["certified_but_broken"][e] == 0
            assert pgd["certified_accuracy"][e] <= pgd["accuracy"][e] <= pgd["clean_accuracy"]
            assert 0.0 <= r["certified_accuracy"][e] <= r["clean_accuracy"]
        cert = [r["certified_accuracy"][e] for e in EPS]
        assert cert == sorted(cert, reverse=True)  # a larger ball certifies no more inputs
        if r["margin_lower"] <= 0:  # a quantized operator not proved monotone certifies nothing
            assert r["certified_agreement_rate"] == 0.0 and max(cert) == 0.0
    trained = [r for r in rows if r["kind"] in ("ste", "margin")]
    assert all(r["history"] for r in trained)  # they were fine-tuned


def test_report_figure_and_resume(study, capsys) -> None:
    argv, out = study
    assert (out / "results.json").exists() or _run(argv, capsys)[0] == 0
    report = (out / "report.md").read_text()
    for section in ("## Protocol", "## Results", "## Checks", "robustness.png"):
        assert section in report
    for ext in ("png", "pdf"):
        assert (out / f"robustness.{ext}").stat().st_size > 1000
    before = json.loads((out / "results.json").read_text())
    assert _run([*argv, "--resume"], capsys)[0] == 0
    after = json.loads((out / "results.json").read_text())
    assert len(after["resumed_stages"]) == len(after["rows"])
    strip = ("seconds", "train_seconds")
    for a, b in zip(before["rows"], after["rows"], strict=True):
        assert {k: v for k, v in a.items() if k not in strip} == {
            k: v for k, v in b.items() if k not in strip
        }


def test_config_specs_and_validation() -> None:
    cfg = RobustnessConfig(Path("m.safetensors"), bits=(4,), methods=("ptq", "proxquant-factors"),
                           train_bits=(3,), robust_eps=0.2)  # fmt: skip
    names = [s["name"] for s in config_specs(cfg)]
    assert names == ["float", "ptq/per-tensor/W4", "proxquant-factors/per-tensor/W3",
                     "margin+lm0.2/per-tensor/W3"]  # fmt: skip
    assert cfg.trains and not RobustnessConfig(Path("m"), methods=("ptq",)).trains
    with pytest.raises(ConfigError, match="unknown methods"):
        RobustnessConfig(Path("m"), methods=("qat",))
    with pytest.raises(ConfigError, match="robust_eps"):
        RobustnessConfig(Path("m"), robust_eps=-1.0)


def test_check_rows_names_every_contradiction() -> None:
    ok = {"name": "a", "status": "ok", "certified_but_disagreeing": 0,
          "pgd": {"certified_but_broken": {"0.1": 0}}}  # fmt: skip
    bad = {"name": "b", "status": "ok", "certified_but_disagreeing": 2,
           "pgd": {"certified_but_broken": {"0.1": 1}}}  # fmt: skip
    assert check_rows([ok]) == []
    assert len(check_rows([ok, bad])) == 2
