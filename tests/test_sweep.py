"""The sweep: power-law fits on synthetic data, sizes without weights, and a two-size,
two-variant sweep end to end through the command line, run twice (the second reuses it)."""

import dataclasses
import json

import numpy as np
import pytest

import fluid.eval._sweep
import fluid.train
from fluid.build import abstract_model, non_embedding_params
from fluid.cli import main
from fluid.eval import (
    SCALES,
    fit_power_law,
    fit_power_law_with_floor,
    parse_size,
    sweep_config,
)

N = np.geomspace(1e4, 1e7, 8)


def test_fit_power_law_recovers_exact_data():
    a, alpha = fit_power_law(N, 3.2 * N**-0.12)
    np.testing.assert_allclose([a, alpha], [3.2, 0.12], rtol=1e-9)


def test_fit_power_law_recovers_noisy_data():
    # 1% multiplicative noise: the exponent's standard error is about 0.0017 here, the
    # prefactor's about 2%; the tolerances are five standard errors or more.
    noise = np.exp(0.01 * np.random.default_rng(0).standard_normal(len(N)))
    a, alpha = fit_power_law(N, 3.2 * N**-0.12 * noise)
    assert abs(alpha - 0.12) < 0.01
    assert abs(a / 3.2 - 1) < 0.1


def test_fit_power_law_with_floor_recovers_the_floor():
    n = np.geomspace(1e3, 1e8, 6)
    a, alpha, floor = fit_power_law_with_floor(n, 0.5 + 3.0 * n**-0.3)
    np.testing.assert_allclose([a, alpha, floor], [3.0, 0.3, 0.5], rtol=1e-4)
    # With 1% noise on six points over five decades: the floor within 4%, the exponent
    # within 0.05 (seeds 0-4 stay within 0.012 and 0.047).
    noise = np.exp(0.01 * np.random.default_rng(1).standard_normal(len(n)))
    a, alpha, floor = fit_power_law_with_floor(n, (0.5 + 3.0 * n**-0.3) * noise)
    assert abs(floor - 0.5) < 0.02 and abs(alpha - 0.3) < 0.05


def test_fit_power_law_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="two or more distinct sizes"):
        fit_power_law([10.0, 10.0], [1.0, 0.9])
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([10.0, 100.0], [1.0, -0.1])
    with pytest.raises(ValueError, match="four or more"):
        fit_power_law_with_floor([10.0, 100.0, 1000.0], [1.0, 0.9, 0.8])


def test_sizes_grow_across_the_default_grid():
    assert parse_size("w96d3") == (96, 3, 3)
    with pytest.raises(ValueError, match="w<width>d<depth>"):
        parse_size("96x3")
    scale = SCALES["small"]
    for variant in ("fluid", "discrete-raster"):
        counts = [
            non_embedding_params(abstract_model(sweep_config(variant, s, scale).model))
            for s in scale.sizes
        ]
        assert counts == sorted(counts) and counts[-1] > 4 * counts[0], counts


def test_a_scale_sets_the_data_style():
    assert sweep_config("fluid", "w16d1", SCALES["tiny"]).data.style == "flat"
    shaded = dataclasses.replace(SCALES["tiny"], style="shaded")
    for variant in ("fluid", "discrete-raster"):
        assert sweep_config(variant, "w16d1", shaded).data.style == "shaded"


SWEEP = ["sweep", "--scale", "tiny", "--variants", "fluid", "discrete-raster"]


def test_sweep_runs_end_to_end_and_reuses_finished_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLUID_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    assert main([*SWEEP, "--out", str(out)]) == 0
    report = json.loads((out / "sweep.json").read_text())
    assert {(r["variant"], r["size"]) for r in report["runs"]} == {
        (v, s) for v in ("fluid", "discrete-raster") for s in SCALES["tiny"].sizes
    }
    for r in report["runs"]:
        assert r["step"] == SCALES["tiny"].steps
        assert np.isfinite(r["validation"]["loss"]) and r["frechet"]["rough"]
        run = out / f"{r['variant']}-{r['size']}"
        for name in ("eval.json", "eval.md", "samples.png"):
            assert (run / "eval" / name).stat().st_size > 0
    assert set(report["fits"]) == {"fluid", "discrete-raster"}
    assert all(np.isfinite(f["alpha"]) for f in report["fits"].values())
    for name in ("loss_vs_params.png", "metrics_vs_params.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "sweep.md").read_text()
    assert "| fluid | w32d2 |" in table and "| discrete-raster |" in table

    # Run again: nothing is trained or evaluated, and the report is the same.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained or evaluated again")

    monkeypatch.setattr(fluid.train.Trainer, "__init__", refuse)
    monkeypatch.setattr(fluid.eval._sweep, "evaluate_checkpoint", refuse)
    capsys.readouterr()
    assert main([*SWEEP, "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("finished earlier") == 4
    again = json.loads((out / "sweep.json").read_text())
    assert again["runs"] == report["runs"] and again["fits"] == report["fits"]
    monkeypatch.undo()

    # `fluid eval` on one of the runs: the same code, its own report.
    monkeypatch.setenv("FLUID_CACHE", str(tmp_path / "cache"))
    run = out / "fluid-w16d1"
    with pytest.raises(ValueError, match="too few for the Frechet distance"):
        main(["eval", str(run), "--samples", "12"])
    report_dir = tmp_path / "eval"
    assert main(["eval", str(run), "--samples", "12", "--min-count", "2",
                 "--validation-examples", "16", "--out", str(report_dir)]) == 0
    result = json.loads((report_dir / "eval.json").read_text())
    assert result["step"] == SCALES["tiny"].steps and result["frechet"]["samples"] == 12
    # The validation loss of the same weights on the same held-out set is the sweep's.
    sweep_run = next(r for r in report["runs"] if r["variant"] == "fluid" and r["size"] == "w16d1")
    assert result["validation"]["loss"] == sweep_run["validation"]["loss"]
    assert "validation loss" in (report_dir / "eval.md").read_text()
