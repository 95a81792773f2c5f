"""The sweep: power-law fits on synthetic data, the Student-t interval against references,
means and per-seed fits over seeds on synthetic runs, sizes without weights, and a two-size,
two-variant sweep end to end through the command line, run twice (the second reuses it),
then a second seed of one run beside it."""

import dataclasses
import json
import math

import numpy as np
import pytest

import fluid.eval._sweep
import fluid.run
import fluid.train
from fluid.build import abstract_model, non_embedding_params
from fluid.cli import main
from fluid.eval import (
    SCALES,
    fit_power_law,
    fit_power_law_with_floor,
    mean_interval,
    parse_size,
    sweep_config,
    sweep_run_name,
)
from fluid.eval._sweep_report import summarise, write_report

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


def numpy_t_interval(values, t):
    """The Student-t interval transcribed in NumPy, with the quantile `t` given."""
    values = np.asarray(values, np.float64)
    half = t * values.std(ddof=1) / np.sqrt(len(values))
    return values.mean(), values.mean() - half, values.mean() + half


# Quantiles with closed forms: t_{p,1} = tan(pi (p - 1/2)) (Cauchy) and
# t_{p,2} = (2p - 1) sqrt(2 / (1 - (2p - 1)^2)).
T_975_1 = math.tan(math.pi * 0.475)
T_975_2 = 0.95 * math.sqrt(2 / (1 - 0.95**2))


def test_mean_interval_matches_the_t_quantile():
    np.testing.assert_allclose(T_975_2, 4.30265272974946, rtol=1e-14)
    for values, t in (([1.0, 4.0], T_975_1), ([0.31, 0.27, 0.35], T_975_2)):
        np.testing.assert_allclose(mean_interval(values), numpy_t_interval(values, t), rtol=1e-12)
    mean, low, high = mean_interval([0.5])
    assert mean == 0.5 and math.isnan(low) and math.isnan(high)  # one value: no interval
    assert mean_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="non-empty"):
        mean_interval([])
    with pytest.raises(ValueError, match="confidence"):
        mean_interval([1.0, 2.0], confidence=1.0)


def test_mean_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (2, 3, 4, 5, 8, 17, 40):
        values = rng.normal(3.0, 0.5, n)
        for confidence in (0.5, 0.9, 0.95, 0.99):
            expected = stats.t.interval(confidence, n - 1, loc=values.mean(),
                                        scale=stats.sem(values))
            np.testing.assert_allclose(mean_interval(values, confidence)[1:], expected,
                                       rtol=1e-12)


def synthetic_runs(seeds, sizes=(1e4, 1e5, 1e6)):
    """Run records as `run_one` returns them, for two variants, without training: a power
    law with seed-dependent noise."""
    rng = np.random.default_rng(0)
    runs = []
    for seed in range(seeds):
        for variant, tokenizer, alpha in (("fluid", "patch", 0.1), ("discrete-raster", "vq", 0.2)):
            for i, n in enumerate(sizes):
                noise = np.exp(0.05 * rng.standard_normal(4))
                runs.append({
                    "variant": variant, "size": f"s{i}", "seed": seed,
                    "model": {"tokenizer": tokenizer}, "non_embedding_parameters": int(n),
                    "validation": {"loss": 3.0 * n**-alpha * noise[0]},
                    "shapes_eval": {"overall": 0.4 * noise[1],
                                    "categories": {"colors": 0.3 * noise[2],
                                                   "counting": 0.5 * noise[3]}},
                    "frechet": {"distance": 2.0 * noise[1], "rough": True},
                    "median_step_seconds": 0.01,
                })
    return runs


def test_seeds_summarise_into_means_intervals_and_per_seed_fits(tmp_path):
    runs = synthetic_runs(seeds=3)
    aggregates, fits = summarise(runs)
    assert [(a["variant"], a["size"]) for a in aggregates] == [
        (v, s) for v in ("fluid", "discrete-raster") for s in ("s0", "s1", "s2")
    ]
    for a in aggregates:
        mine = [r for r in runs if (r["variant"], r["size"]) == (a["variant"], a["size"])]
        assert a["seeds"] == [0, 1, 2]
        for summary, values in (
            (a["validation_loss"], [r["validation"]["loss"] for r in mine]),
            (a["shapes_eval"], [r["shapes_eval"]["overall"] for r in mine]),
            (a["shapes_eval_categories"]["colors"],
             [r["shapes_eval"]["categories"]["colors"] for r in mine]),
            (a["frechet"], [r["frechet"]["distance"] for r in mine]),
        ):
            assert summary["n"] == 3
            np.testing.assert_allclose(summary["mean"], np.mean(values), rtol=1e-12)
            np.testing.assert_allclose([summary["low"], summary["high"]],
                                       numpy_t_interval(values, T_975_2)[1:], rtol=1e-12)
    for variant, fit in fits.items():
        alphas = []
        for seed in range(3):
            mine = [r for r in runs if r["variant"] == variant and r["seed"] == seed]
            a, alpha = fit_power_law([r["non_embedding_parameters"] for r in mine],
                                     [r["validation"]["loss"] for r in mine])
            assert fit["seeds"][seed] == {"seed": seed, "a": a, "alpha": alpha}
            alphas.append(alpha)
        spread = fit["alpha_over_seeds"]
        np.testing.assert_allclose([spread["mean"], spread["low"], spread["high"]],
                                   numpy_t_interval(alphas, T_975_2), rtol=1e-12)
        means = [a for a in aggregates if a["variant"] == variant]
        assert (fit["a"], fit["alpha"]) == fit_power_law(
            [a["non_embedding_parameters"] for a in means],
            [a["validation_loss"]["mean"] for a in means],
        )
    assert abs(fits["fluid"]["alpha"] - 0.1) < 0.05
    assert abs(fits["discrete-raster"]["alpha"] - 0.2) < 0.05

    report = {"scale": "tiny", "steps": 4, "seeds": 3, "runs": runs, "aggregates": aggregates,
              "fits": fits}
    write_report(report, tmp_path)
    table = (tmp_path / "sweep.md").read_text()
    loss = aggregates[0]["validation_loss"]
    assert f"| fluid | s0 | 10,000 | 3 | {loss['mean']:.4f} [{loss['low']:.4f}, " in table
    assert "| variant | size | colors | counting |" in table
    for name in ("loss_vs_params.png", "metrics_vs_params.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "sweep.json").read_text())["aggregates"] == aggregates


def test_one_seed_has_no_interval(tmp_path):
    runs = synthetic_runs(seeds=1)
    aggregates, fits = summarise(runs)
    assert all(a["validation_loss"]["low"] is None for a in aggregates)
    assert aggregates[0]["validation_loss"]["mean"] == runs[0]["validation"]["loss"]
    assert fits["fluid"]["alpha_over_seeds"]["low"] is None
    # One run per size: the fit to the means is the fit to the runs.
    fluid_runs = [r for r in runs if r["variant"] == "fluid"]
    assert (fits["fluid"]["a"], fits["fluid"]["alpha"]) == fit_power_law(
        [r["non_embedding_parameters"] for r in fluid_runs],
        [r["validation"]["loss"] for r in fluid_runs],
    )
    write_report({"scale": "tiny", "steps": 4, "seeds": 1, "runs": runs,
                  "aggregates": aggregates, "fits": fits}, tmp_path)
    table = (tmp_path / "sweep.md").read_text()
    assert "no intervals" in table and "[" not in table.split("Power laws")[0]


def test_seeds_name_runs_and_set_every_seed():
    assert sweep_run_name("fluid", "w16d1") == "fluid-w16d1"
    assert sweep_run_name("fluid", "w16d1", 2) == "fluid-w16d1-seed2"
    scale = SCALES["tiny"]
    assert sweep_config("fluid", "w16d1", scale) == sweep_config("fluid", "w16d1", scale, seed=0)
    config = sweep_config("discrete-arpg", "w32d2", scale, seed=3)
    assert (config.seed, config.data.seed) == (3, 3)


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
        # Issue 22: sizes spanning at least 10x in non-embedding parameters.
        assert counts == sorted(counts) and counts[-1] >= 10 * counts[0], counts
    assert scale.seeds >= 3


def test_a_scale_sets_the_data_style():
    assert sweep_config("fluid", "w16d1", SCALES["tiny"]).data.style == "flat"
    shaded = dataclasses.replace(SCALES["tiny"], style="shaded")
    for variant in ("fluid", "discrete-raster"):
        assert sweep_config(variant, "w16d1", shaded).data.style == "shaded"


def test_runs_train_as_the_paper_trains():
    scale = SCALES["small"]
    lr = scale.learning_rate
    fluid_run = sweep_config("fluid", "w64d2", scale)
    # Fluid's cosine mask ratios over [0, 1], its constant rate for continuous tokens.
    assert fluid_run.model.order.kwargs["mask_schedule"] == "cosine"
    assert (fluid_run.optim.schedule, fluid_run.optim.learning_rate) == ("constant", lr)
    for variant in ("discrete-random", "discrete-raster"):  # cosine decay for discrete tokens
        assert sweep_config(variant, "w64d2", scale).optim.schedule == "cosine"
    assert sweep_config("discrete-random", "w64d2", scale).model.order.kwargs == {
        "mask_schedule": "cosine"}
    assert sweep_config("continuous-raster", "w64d2", scale).optim.schedule == "constant"
    # Both are settings of the scale: MAR's mask ratios, a rate per width.
    varied = dataclasses.replace(scale, mask_schedule="mar", lr_width_exponent=1.0)
    assert sweep_config("fluid", "w64d2", varied).model.order.kwargs["mask_schedule"] == "mar"
    first = parse_size(scale.sizes[0])[0]
    assert sweep_config("fluid", "w96d3", varied).optim.learning_rate == pytest.approx(
        lr * first / 96)
    assert sweep_config("fluid", scale.sizes[0], varied).optim.learning_rate == lr


def test_a_size_a_variant_cannot_take_stops_the_sweep_before_any_training(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a run trained before the sweep was checked")

    monkeypatch.setattr(fluid.train.Trainer, "__init__", refuse)
    # The arpg backbone needs a content and a query block: the tiny scale's w16d1 has one.
    with pytest.raises(ValueError, match="cannot build discrete-arpg at size w16d1.*--sizes"):
        fluid.eval.run_sweep(tmp_path, scale="tiny", variants=["fluid", "discrete-arpg"],
                             progress=False)
    assert not any(tmp_path.iterdir())


def test_a_run_folder_of_another_setting_is_refused_not_reused(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a run of another setting was trained or evaluated")

    monkeypatch.setattr(fluid.train.Trainer, "__init__", refuse)
    monkeypatch.setattr(fluid.eval._sweep, "evaluate_checkpoint", refuse)
    scale = SCALES["tiny"]
    older = dataclasses.replace(scale, mask_schedule="mar")  # a sweep from before the fix
    (tmp_path / "fluid-w16d1").mkdir()
    fluid.run.RunFolder(tmp_path / "fluid-w16d1").write_config(
        sweep_config("fluid", "w16d1", older))
    with pytest.raises(fluid.run.CheckpointMismatchError, match="mask_schedule"):
        fluid.eval.run_one("fluid", "w16d1", scale, tmp_path, progress=False)


def test_proportion_intervals_stay_within_zero_and_one():
    runs = synthetic_runs(seeds=3, sizes=(1e4,))
    for r, score in zip([r for r in runs if r["variant"] == "fluid"], (0.0, 0.0, 0.1)):
        r["shapes_eval"]["overall"] = score
    aggregates, _ = summarise(runs)
    shapes = next(a for a in aggregates if a["variant"] == "fluid")["shapes_eval"]
    _, low, high = numpy_t_interval([0.0, 0.0, 0.1], T_975_2)
    assert low < 0  # the Student-t interval itself reaches below zero here
    assert (shapes["low"], shapes["high"]) == (0.0, pytest.approx(high, rel=1e-12))


def test_the_sweeps_flags_reach_its_setting(tmp_path, monkeypatch):
    seen = {}

    def run_sweep(out, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(fluid.eval, "run_sweep", run_sweep)
    with pytest.raises(SystemExit):
        main(["sweep", "--scale", "tiny", "--out", str(tmp_path), "--mask-schedule", "mar",
              "--lr-width-exponent", "1", "--style", "shaded"])
    assert seen["options"] == {"mask_schedule": "mar", "lr_width_exponent": 1.0,
                               "style": "shaded"}
    setting = fluid.eval.scale_setting("tiny", seen["options"])
    assert (setting.mask_schedule, setting.lr_width_exponent, setting.style) == (
        "mar", 1.0, "shaded")
    with pytest.raises(ValueError, match="unknown sweep settings \\['colour'\\]"):
        fluid.eval.scale_setting("tiny", {"colour": "red"})
    with pytest.raises(ValueError, match="unknown scale 'huge'"):
        fluid.eval._sweep.run_sweep(tmp_path, scale="huge")  # the real one


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
    capsys.readouterr()
    assert main(["eval", str(run), "--samples", "12"]) == 2  # a user error: said, not raised
    assert "too few for the Frechet distance" in capsys.readouterr().err
    report_dir = tmp_path / "eval"
    assert main(["eval", str(run), "--samples", "12", "--min-count", "2",
                 "--validation-examples", "16", "--out", str(report_dir)]) == 0
    result = json.loads((report_dir / "eval.json").read_text())
    assert result["step"] == SCALES["tiny"].steps and result["frechet"]["samples"] == 12
    # The validation loss of the same weights on the same held-out set is the sweep's.
    sweep_run = next(r for r in report["runs"] if r["variant"] == "fluid" and r["size"] == "w16d1")
    assert result["validation"]["loss"] == sweep_run["validation"]["loss"]
    assert "validation loss" in (report_dir / "eval.md").read_text()

    # A second seed of one run: seed 0 is the folder above, reused; only seed 1 trains.
    evaluated = []
    evaluate = fluid.eval._sweep.evaluate_checkpoint

    def record(checkpoint, **options):
        evaluated.append((checkpoint.parent.parent.name, options["seed"]))
        return evaluate(checkpoint, **options)

    monkeypatch.setattr(fluid.eval._sweep, "evaluate_checkpoint", record)
    capsys.readouterr()
    assert main([*SWEEP[:4], "fluid", "--sizes", "w16d1", "--seeds", "2", "--out", str(out)]) == 0
    assert "fluid-w16d1: finished earlier" in capsys.readouterr().out
    assert evaluated == [("fluid-w16d1-seed1", 1)]
    seeded = json.loads((out / "sweep.json").read_text())
    assert [(r["size"], r["seed"]) for r in seeded["runs"]] == [("w16d1", 0), ("w16d1", 1)]
    assert seeded["runs"][0]["validation"] == sweep_run["validation"]
    config = fluid.run.RunFolder(out / "fluid-w16d1-seed1").read_config()
    assert (config.seed, config.data.seed) == (1, 1)
    losses = [r["validation"]["loss"] for r in seeded["runs"]]
    assert losses[0] != losses[1]  # another initialisation, data and held-out set
    (aggregate,) = seeded["aggregates"]
    assert aggregate["seeds"] == [0, 1]
    np.testing.assert_allclose(aggregate["validation_loss"]["mean"], np.mean(losses), rtol=1e-12)
    np.testing.assert_allclose(
        [aggregate["validation_loss"]["low"], aggregate["validation_loss"]["high"]],
        numpy_t_interval(losses, T_975_1)[1:], rtol=1e-12,
    )
    assert "| fluid | w16d1 |" in (out / "sweep.md").read_text()
