"""``monquant conv`` end to end on a tiny MNIST: every stage, the report files, resume."""

from __future__ import annotations

import json

import pytest

from monquant.errors import ConfigError
from monquant.experiments.conv.study import QAT_ROWS, ConvStudyConfig, run_conv_study
from monquant.runtime import torch_threads


def test_conv_study_runs_renders_and_resumes(tmp_path, tiny_mnist) -> None:
    from monquant.data import load_mnist

    data = load_mnist(tiny_mnist(tmp_path / "mnist", 256, 128), download=False)
    cfg = ConvStudyConfig.quick_config(out=tmp_path / "out", channels=3, train_limit=256,
                                       phase_test_limit=64, test_limit=64,
                                       displacement_samples=16, qat_train_limit=128,
                                       progress=False)  # fmt: skip
    res = run_conv_study(cfg, data, echo=None)
    for name in ("report.md", "results.json", "conv.png", "conv.pdf"):
        assert (cfg.out / name).is_file()
    phase = res["phase"]["conv"]
    assert {r["bits"] for r in phase["rows"]} == set(cfg.bits)
    assert all(r["unconverged"] == 0 for r in phase["rows"] if r["verdict"] == "certified")
    for row in res["displacement"]["rows"]:
        assert row["fraction_within_bound"] == 1.0
    qat = {r["kind"]: r for r in res["qat"]["rows"]}
    assert qat["proxquant-factors"]["tier"] == "construction"
    assert res["compare"]["conv"]["operator_parameters"] == 2 * 3 * 3 * 9 + 1
    tiers = res["phase"]["multitier"]
    assert {r["bits"] for r in tiers["rows"]} == set(cfg.bits)
    assert all(r["verdict"] in ("certified", "refuted", "undecided") for r in tiers["rows"])
    eight = [r for r in tiers["rows"] if r["bits"] == 8]
    assert all(r["verdict"] == "certified" and r["margin_quantized_lower"] > 0 for r in eight)
    assert res["compare"]["multitier"]["margin_lower"] > 0  # by construction, proved
    assert res["compare"]["multitier"]["state_size"] == 1 * 784 + 2 * 196 + 2 * 49
    report = (cfg.out / "report.md").read_text()
    assert "Theorem 3 displacement" in report and "conv.png" in report
    again = run_conv_study(ConvStudyConfig.quick_config(**{**cfg.as_dict(), "resume": True}), data,
                           echo=None)  # fmt: skip
    assert set(again["resumed_stages"]) == set(res["stage_seconds"])
    stored = json.loads((cfg.out / "results.json").read_text())
    assert stored["qat"]["rows"][0]["label"] == res["qat"]["rows"][0]["label"]
    # each low-bit configuration is its own stage: one added to a finished study runs alone
    assert {"qat_ste_4", "qat_proxquant-factors_4"} <= set(res["stage_seconds"])
    rows = (*cfg.qat_rows, ("proxquant-factors", 2))
    more = ConvStudyConfig.quick_config(**{**cfg.as_dict(), "resume": True, "qat_rows": rows})
    added = run_conv_study(more, data, echo=None)
    assert set(res["stage_seconds"]) - set(added["resumed_stages"]) == set()
    assert set(added["stage_seconds"]) - set(added["resumed_stages"]) == {"qat_proxquant-factors_2"}
    two = added["qat"]["rows"][-1]
    assert (two["bits"], two["tier"], two["status"]) == (2, "construction", "ok")
    # the low-bit configurations again, as tasks in two worker processes: the same rows
    qat_stages = [f"qat_{k}_{b}" for k, b in cfg.qat_rows]
    for name in (*qat_stages, "compare_tiers"):
        (cfg.out / "stages" / f"{name}.json").unlink()
    with torch_threads(1):
        serial_rows = run_conv_study(ConvStudyConfig.quick_config(**{**cfg.as_dict(), "resume": True}),
                                     data, echo=None)["qat"]["rows"]  # fmt: skip
    for name in (*qat_stages, "compare_tiers"):
        (cfg.out / "stages" / f"{name}.json").unlink()
    procs = ConvStudyConfig.quick_config(**{**cfg.as_dict(), "resume": True, "executor": "process",
                                            "workers": 2, "worker_threads": 1})  # fmt: skip
    rows = run_conv_study(procs, data, echo=None)["qat"]["rows"]
    assert [r["label"] for r in rows] == [r["label"] for r in serial_rows]
    for a, b in zip(rows, serial_rows, strict=True):
        assert a["status"] == b["status"] == "ok"
        assert {k: v for k, v in a.items() if k != "events"} == {k: v for k, v in b.items() if k != "events"}


def test_conv_study_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="executor"):
        ConvStudyConfig(executor="threads")
    with pytest.raises(ConfigError, match="proxquant"):
        ConvStudyConfig(qat_kinds=("proxquant-w",))
    with pytest.raises(ConfigError, match="named twice"):
        ConvStudyConfig(qat_rows=(("ste", 4), ("ste", 4)))
    assert ConvStudyConfig().qat_rows == QAT_ROWS
    assert ConvStudyConfig(qat_bits=(2,)).qat_rows == (("ste", 2), ("margin", 2), ("proxquant-factors", 2))
    assert ConvStudyConfig(qat_kinds=("ste",)).qat_rows == (("ste", 4),)
    assert ConvStudyConfig.quick_config(qat_bits=(2,)).qat_rows == (("ste", 2), ("margin", 2),
                                                                   ("proxquant-factors", 2))  # fmt: skip
    with pytest.raises(ConfigError, match="tol"):
        ConvStudyConfig(tol=0.1)
    with pytest.raises(ConfigError, match="tier_channels"):
        ConvStudyConfig(tier_channels=(4,))


def test_a_vacuous_displacement_row_is_shown_as_not_checkable() -> None:
    from monquant.experiments.conv.report import _disp_table

    row = {"bits": 4, "dW_over_m": 2.3, "samples": 8, "float_converged": 8, "quantized_converged": 8,
           "fraction_within_bound": None, "violations": 0, "vacuous_samples": 8,
           "median_ratio_bound_over_empirical": None, "max_solver_error_bound": None}  # fmt: skip
    ok = dict(row, bits=8, fraction_within_bound=1.0, vacuous_samples=0, max_solver_error_bound=1e-7)
    _, rows = _disp_table({"displacement": {"rows": [row, ok]}})
    assert rows[0][4].startswith("not checkable") and rows[0][7].startswith("none") and rows[0][6] == "-"
    assert rows[1][4] == "100.0%" and rows[1][7] == "1.00e-07"
    old = {k: v for k, v in row.items() if k != "vacuous_samples"} | {"fraction_within_bound": 1.0}
    _, rows = _disp_table({"displacement": {"rows": [old]}})  # a stage file from before the fix
    assert rows[0][4].startswith("not checkable")
