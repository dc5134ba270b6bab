"""`monquant lowbit`: the quick pipeline on synthetic data, its report, resume and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from monquant.cli import main
from monquant.data import MNIST
from monquant.errors import ConfigError
from monquant.experiments.lowbit_study.report import NAMES, aggregate, judge_targets
from monquant.experiments.lowbit_study.study import LowbitConfig, run_lowbit, stage_name
from monquant.training.methods import KINDS, QuantMethod

FEATURES = 20


def _synthetic(seed: int = 0, n_train: int = 600, n_test: int = 200) -> MNIST:
    """Ten Gaussian clusters in 20 dimensions, in MNIST's container."""
    g = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(10, FEATURES, generator=g)

    def draw(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (k,), generator=g)
        return centers[y] + torch.randn(k, FEATURES, generator=g), y

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    return MNIST(x_tr, y_tr, x_te, y_te, source=Path("synthetic"), md5={})


QUICK = dict(hidden=8, train_limit=None, test_limit=None, check_limit=50, float_epochs=1)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("lowbit")
    res = run_lowbit(out, _synthetic(), quick=True, progress=False, echo=None, **QUICK)
    return out, res


def test_quick_writes_report_results_and_figures(quick):
    out, _ = quick
    for name in ("report.md", "results.json"):
        assert (out / name).stat().st_size > 0
    for ext in ("png", "pdf"):
        assert (out / f"lowbit.{ext}").stat().st_size > 1000
    report = (out / "report.md").read_text()
    for section in ("## Protocol", "## Targets", "## Comparison", "## Mixed precision"):
        assert section in report
    for name in NAMES.values():
        assert name in report
    table_rows = [line for line in report.splitlines() if line.startswith("| W")]
    assert len(table_rows) == len(KINDS) * 2 + 1  # 2 and 4 bits, plus the W4/U8 row
    assert sum(line.startswith("| W4/U8 | per-tensor | PTQ |") for line in table_rows) == 1


def test_quick_table_has_every_configuration(quick):
    out, _ = quick
    stored = json.loads((out / "results.json").read_text())
    labels = {g["label"] for g in stored["groups"]}
    expected = {QuantMethod(k, b).label for k in KINDS for b in (2, 4)}
    expected.add(QuantMethod("ptq", 4, "per-tensor", u_bits=8).label)
    assert labels == expected
    for g in stored["groups"]:
        assert g["n"] == 1 and g["seeds"] == [0]
        assert g["tier_all"] in ("none", "exact", "weyl", "a_priori", "construction")
        if g["failed"] == 0:
            assert g["storage_bits"]["W"] > 0 and g["products_per_iteration"] > 0
    fac = next(g for g in stored["groups"] if g["label"] == "proxquant-factors/per-tensor/W2")
    assert fac["tier_all"] == "construction" and fac["certified"] == 1
    assert [t["bits"] for t in stored["targets"]] == [4, 3, 2]
    assert stored["not_run"] == []
    for stage in ("float-s0", "ptq-s0", stage_name(QuantMethod("margin", 2), 0)):
        assert (out / "stages" / f"{stage}.json").exists()


def test_resume_skips_finished_stages(quick, capsys):
    out, first = quick
    res = run_lowbit(
        out, _synthetic(), quick=True, resume=True, progress=False, echo=print, **QUICK
    )
    printed = capsys.readouterr().out
    assert printed.count("skipped") == len(first["stage_seconds"])
    assert [g["label"] for g in res["groups"]] == [g["label"] for g in first["groups"]]


def test_resume_refuses_stages_computed_with_other_settings(quick):
    out, _ = quick
    with pytest.raises(ConfigError, match="other settings"):
        run_lowbit(
            out, _synthetic(), quick=True, resume=True, epochs=2, progress=False, echo=None, **QUICK
        )


def test_time_budget_leaves_stages_for_resume(tmp_path):
    res = run_lowbit(
        tmp_path,
        _synthetic(),
        quick=True,
        methods=("ptq", "margin"),
        progress=False,
        echo=None,
        budget_s=0.0,
        **QUICK,
    )
    assert res["rows"] == [] and len(res["not_run"]) >= 3
    assert "INCOMPLETE" in (tmp_path / "report.md").read_text()


def test_targets_need_every_seed_certified():
    rows = [
        {
            "label": "m/W3",
            "kind": "margin",
            "granularity": "per-tensor",
            "bits": 3,
            "u_bits": None,
            "status": "ok",
            "seed": s,
            "accuracy": acc,
            "margin_quantized": mq,
            "dW_over_m": 0.5,
            "converged_fraction": 1.0,
            "mean_iterations": 10.0,
            "tier": "weyl" if mq > 0 else "none",
            "certified": mq > 0,
            "certified_weyl": mq > 0,
            "storage_bits": {"W": 1},
            "products_per_iteration": 1,
        }
        for s, acc, mq in ((0, 0.98, 0.1), (1, 0.98, 0.2), (2, 0.99, -0.01))
    ]
    groups = aggregate(rows)
    assert groups[0]["certified"] == 2 and groups[0]["tier_all"] == "none"
    t3 = next(t for t in judge_targets(groups, 3) if t["bits"] == 3)
    assert not t3["met"]
    rows[2].update(margin_quantized=0.05, tier="exact", certified=True)
    t3 = next(t for t in judge_targets(aggregate(rows), 3) if t["bits"] == 3)
    assert t3["met"] and t3["met_by"] == ["margin-aware QAT (per-tensor)"]


def test_config_specs_cover_methods_bits_and_mixed_rows():
    cfg = LowbitConfig()
    specs = cfg.method_specs()
    assert len(specs) == 5 * 5 * 2 + len(cfg.mixed) * len(cfg.mixed_kinds)
    assert len({stage_name(m, 0) for m in specs}) == len(specs)
    prox = [m for m in specs if m.kind.startswith("prox")]
    assert all(m.freeze_epoch == cfg.epochs - 1 for m in prox)


def test_cli_quick_on_mnist(tmp_path, mnist_dir, capsys):
    rc = main(
        [
            "lowbit",
            "--quick",
            "--methods",
            "ptq",
            "proxquant-factors",
            "--out",
            str(tmp_path),
            "--data-dir",
            str(mnist_dir),
            "--no-download",
            "--no-progress",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "ProxQuant on factors" in out and "report:" in out
    assert (tmp_path / "report.md").exists()


# ---------------------------------------------------------------- executors (issue 16)

# timings, the settings (they name the executor) and paths into each run's own folder
TIMING_KEYS = {"train_seconds", "seconds", "stage_seconds", "stage_seconds_sum",
               "wall_seconds_this_invocation", "config", "command", "resumed_stages", "eval_seconds",
               "model"}  # fmt: skip


def _comparable(obj):
    """results.json without timings and the executor settings (everything else must match)."""
    if isinstance(obj, dict):
        return {k: _comparable(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_comparable(v) for v in obj]
    return obj


def _sweep(out, executor: str, **kw):
    torch.set_num_threads(1)  # the serial run and every worker use one thread: same arithmetic
    run_lowbit(out, _synthetic(), quick=True, methods=("ptq", "ste", "margin"), progress=False,
               echo=None, executor=executor, **QUICK, **kw)  # fmt: skip
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def serial_sweep(tmp_path_factory):
    before = torch.get_num_threads()
    try:
        return _sweep(tmp_path_factory.mktemp("serial"), "serial")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("executor", ["process", "ray"])
def test_executors_give_the_serial_results(tmp_path, serial_sweep, executor):
    if executor == "ray":
        pytest.importorskip("ray")
    before = torch.get_num_threads()
    try:
        res = _sweep(tmp_path, executor, workers=2)
    finally:
        torch.set_num_threads(before)
    assert _comparable(res) == _comparable(serial_sweep)
    assert res["config"]["executor"] == executor and res["rows"]


def test_a_failed_task_is_a_row_and_resume_retries_it(tmp_path, monkeypatch):
    from monquant.experiments.lowbit_study import study

    real = study._config_stage

    def flaky(cfg, method, *a, **kw):
        if method.kind == "ste":
            raise RuntimeError("worker lost")
        return real(cfg, method, *a, **kw)

    monkeypatch.setattr(study, "_config_stage", flaky)
    res = run_lowbit(tmp_path, _synthetic(), quick=True, methods=("ptq", "ste"), progress=False,
                     echo=None, **QUICK)  # fmt: skip
    failed = [r for r in res["rows"] if r["status"] == "failed"]
    assert failed and all("worker lost" in r["error"] for r in failed)
    assert not any((tmp_path / "stages").glob("ste-*"))  # not saved: --resume retries it
    monkeypatch.setattr(study, "_config_stage", real)
    again = run_lowbit(tmp_path, _synthetic(), quick=True, methods=("ptq", "ste"), resume=True,
                       progress=False, echo=None, **QUICK)  # fmt: skip
    assert all(r["status"] == "ok" for r in again["rows"])


def test_executor_settings_are_checked() -> None:
    from monquant.executors import ExecutorSpec

    with pytest.raises(ConfigError, match="executor"):
        ExecutorSpec("dask")
    with pytest.raises(ConfigError, match="address"):
        ExecutorSpec("process", address="auto")
