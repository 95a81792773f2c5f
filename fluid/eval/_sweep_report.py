"""A sweep's report from its runs: per (variant, size) the mean over seeds with a Student-t
interval, power laws fitted per variant (to the seed means and to each seed alone), two plots
and a markdown table. Everything here reads run records; nothing trains.
"""

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ..tokenizers import TOKENIZERS
from ._intervals import mean_interval

CONFIDENCE = 0.95


def fit_power_law(n: ArrayLike, loss: ArrayLike) -> tuple[float, float]:
    """Fit `loss = a * n**(-alpha)` by least squares in log-log space.

    **Arguments:**

    - `n`: parameter counts (positive).
    - `loss`: the losses at those counts (positive).

    **Returns:**

    `(a, alpha)`. Raises `ValueError` for fewer than two distinct counts or values that
    are not positive.
    """
    n, loss = np.asarray(n, np.float64), np.asarray(loss, np.float64)
    if n.shape != loss.shape or n.ndim != 1:
        raise ValueError(f"n and loss must be 1-D of one length, got {n.shape} and {loss.shape}.")
    if len(np.unique(n)) < 2:
        raise ValueError("a power law needs losses at two or more distinct sizes.")
    if np.any(n <= 0) or np.any(loss <= 0) or not np.all(np.isfinite(loss)):
        raise ValueError("a power law is fitted to positive, finite counts and losses.")
    slope, intercept = np.polyfit(np.log(n), np.log(loss), 1)
    return float(np.exp(intercept)), float(-slope)


def fit_power_law_with_floor(
    n: ArrayLike, loss: ArrayLike, grid: int = 200
) -> tuple[float, float, float]:
    """Fit `loss = floor + a * n**(-alpha)`, with an irreducible loss `floor >= 0`.

    For a given `floor` the power law of `loss - floor` is fitted in log-log space
    (`fit_power_law`); the `floor` whose curve is closest to the losses (least squares of
    the log of the predicted over the actual loss) wins: searched on a grid over
    `[0, min(loss))`, then refined by golden-section search between the best point's
    neighbours. Three parameters need four or more sizes; with few or noisy points the
    floor is loosely determined (a floor at 0 or next to `min(loss)` says the data do not
    pin it).

    **Returns:**

    `(a, alpha, floor)`.
    """
    n, loss = np.asarray(n, np.float64), np.asarray(loss, np.float64)
    if len(np.unique(n)) < 4:
        raise ValueError("a power law with a floor needs losses at four or more sizes.")
    fit_power_law(n, loss)  # the same checks

    def error(floor: float) -> float:
        a, alpha = fit_power_law(n, loss - floor)
        return float(np.sum(np.log((floor + a * n ** (-alpha)) / loss) ** 2))

    top = loss.min()
    floors = np.linspace(0.0, top, grid, endpoint=False)
    best = int(np.argmin([error(f) for f in floors]))
    lo, hi = floors[max(best - 1, 0)], floors[best + 1] if best + 1 < grid else top * (1 - 1e-9)
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    for _ in range(60):
        left, right = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if error(left) < error(right):
            hi = right
        else:
            lo = left
    floor = (lo + hi) / 2
    a, alpha = fit_power_law(n, loss - floor)
    return a, alpha, float(floor)


# ShapesEval's scores are fractions of images judged right.
PROPORTION = (0.0, 1.0)


def _summary(values: list[float], *, bounds: tuple[float, float] | None = None) -> dict[str, Any]:
    """`{"mean", "low", "high", "n"}` over seeds; `low` and `high` are `None` for one seed
    (no interval) or a value that is not finite. `bounds`: the range the measure cannot
    leave (`(0, 1)` for a proportion); the interval is clipped to it, as a Student-t
    interval of a few proportions near 0 or 1 reaches past them."""
    if len(values) < 2 or not np.all(np.isfinite(values)):
        return {"mean": float(np.mean(values)), "low": None, "high": None, "n": len(values)}
    mean, low, high = mean_interval(values, CONFIDENCE)
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return {"mean": mean, "low": low, "high": high, "n": len(values)}


def _aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (variant, size), in the runs' order, with the seeds' summaries."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["variant"], r["size"]), []).append(r)
    aggregates = []
    for (variant, size), members in groups.items():
        members = sorted(members, key=lambda r: r.get("seed", 0))
        first = members[0]
        # Categories every seed scored (they are the run's categories, the same for all).
        categories = [
            c for c in first["shapes_eval"]["categories"]
            if all(c in r["shapes_eval"]["categories"] for r in members)
        ]
        aggregates.append({
            "variant": variant,
            "size": size,
            "tokens": TOKENIZERS.get(first["model"]["tokenizer"]).token_kind,
            "non_embedding_parameters": first["non_embedding_parameters"],
            "seeds": [r.get("seed", 0) for r in members],
            "validation_loss": _summary([r["validation"]["loss"] for r in members]),
            "shapes_eval": _summary([r["shapes_eval"]["overall"] for r in members],
                                    bounds=PROPORTION),
            "shapes_eval_categories": {
                c: _summary([r["shapes_eval"]["categories"][c] for r in members],
                            bounds=PROPORTION)
                for c in categories
            },
            "frechet": _summary([r["frechet"]["distance"] for r in members]),
            "frechet_rough": any(r["frechet"]["rough"] for r in members),
            "median_step_seconds": (
                float(np.mean(steps))
                if (steps := [r["median_step_seconds"] for r in members
                              if "median_step_seconds" in r]) else None
            ),
        })
    return aggregates


def _fits(runs: list[dict[str, Any]], aggregates: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant with two or more sizes: the power law of the seed means (`a`, `alpha`,
    and `with_floor` with four or more sizes), each seed's own fit (`seeds`) and the mean
    and interval of the seeds' exponents (`alpha_over_seeds`)."""
    fits: dict[str, Any] = {}
    for variant in dict.fromkeys(a["variant"] for a in aggregates):
        points = [a for a in aggregates if a["variant"] == variant]
        n = [a["non_embedding_parameters"] for a in points]
        loss = [a["validation_loss"]["mean"] for a in points]
        if len(set(n)) < 2:
            continue
        a, alpha = fit_power_law(n, loss)
        fits[variant] = {"a": a, "alpha": alpha}
        if len(set(n)) >= 4:
            a4, alpha4, floor = fit_power_law_with_floor(n, loss)
            fits[variant]["with_floor"] = {"a": a4, "alpha": alpha4, "floor": floor}
        per_seed = []
        for seed in sorted({r.get("seed", 0) for r in runs if r["variant"] == variant}):
            mine = [r for r in runs if r["variant"] == variant and r.get("seed", 0) == seed]
            n_seed = [r["non_embedding_parameters"] for r in mine]
            if len(set(n_seed)) >= 2:
                a_seed, alpha_seed = fit_power_law(n_seed, [r["validation"]["loss"] for r in mine])
                per_seed.append({"seed": seed, "a": a_seed, "alpha": alpha_seed})
        fits[variant]["seeds"] = per_seed
        fits[variant]["alpha_over_seeds"] = _summary([f["alpha"] for f in per_seed])
    return fits


def summarise(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`(aggregates, fits)` of a sweep's run records (each with `variant`, `size`, `seed`,
    `non_embedding_parameters` and its `eval.json` numbers)."""
    aggregates = _aggregate(runs)
    return aggregates, _fits(runs, aggregates)


def write_report(report: dict[str, Any], out: Path) -> None:
    """`sweep.json`, `loss_vs_params.png`, `metrics_vs_params.png` and `sweep.md` in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(report, indent=1))
    _plot_loss(report["runs"], report["aggregates"], report["fits"], out / "loss_vs_params.png")
    _plot_metrics(report["aggregates"], out / "metrics_vs_params.png")
    (out / "sweep.md").write_text(_markdown(report))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_variant(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: r["non_embedding_parameters"]):
        out.setdefault(r["variant"], []).append(r)
    return out


def _error_bars(summaries: list[dict[str, Any]]) -> np.ndarray | None:
    """Matplotlib's `yerr` (below, above the mean) of intervals; `None` if any is missing."""
    if any(s["low"] is None for s in summaries):
        return None
    return np.asarray([[s["mean"] - s["low"] for s in summaries],
                       [s["high"] - s["mean"] for s in summaries]])


def _plot_loss(
    runs: list[dict[str, Any]], aggregates: list[dict[str, Any]], fits: dict[str, Any],
    path: Path,
) -> Path:
    """Validation loss against parameters, log-log, one panel per token kind (their losses
    are in different units), with each variant's fitted power law; over several seeds, the
    means with their intervals as error bars and each seed's loss as a faint dot."""
    plt = _pyplot()
    groups = _by_variant(aggregates)
    kinds = list(dict.fromkeys(points[0]["tokens"] for points in groups.values()))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for variant, points in groups.items():
            if points[0]["tokens"] != kind:
                continue
            n = np.asarray([p["non_embedding_parameters"] for p in points], np.float64)
            loss = [p["validation_loss"] for p in points]
            line = ax.errorbar(n, [s["mean"] for s in loss], yerr=_error_bars(loss), fmt="o",
                               capsize=3, label=variant)
            color = line.lines[0].get_color()
            if max(s["n"] for s in loss) > 1:
                mine = [r for r in runs if r["variant"] == variant]
                ax.plot([r["non_embedding_parameters"] for r in mine],
                        [r["validation"]["loss"] for r in mine], ".", color=color, alpha=0.35)
            if variant in fits:
                fit = fits[variant]
                a, alpha = fit["a"], fit["alpha"]
                label = f"{a:.3g} N^-{alpha:.3f}"
                spread = fit.get("alpha_over_seeds")
                if spread is not None and spread["low"] is not None:
                    label += f" (alpha over seeds [{spread['low']:.3f}, {spread['high']:.3f}])"
                grid = np.geomspace(n.min() / 1.3, n.max() * 1.3, 50)
                ax.plot(grid, a * grid ** (-alpha), "-", color=color, lw=1, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("non-embedding parameters N")
        ax.set_ylabel("validation loss per token")
        ax.set_title(f"{kind} tokens")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


METRICS = (
    ("validation loss", "validation_loss", True),
    ("ShapesEval overall", "shapes_eval", False),
    ("Frechet distance (shapes-v1)", "frechet", True),
)


def _plot_metrics(aggregates: list[dict[str, Any]], path: Path) -> Path:
    """Each metric against parameters (log x), one line per variant: the mean over seeds,
    with its interval as error bars over several seeds."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.8), squeeze=False)
    for ax, (name, key, log_y) in zip(axes[0], METRICS):
        for variant, points in _by_variant(aggregates).items():
            n = [p["non_embedding_parameters"] for p in points]
            values = [p[key] for p in points]
            ax.errorbar(n, [s["mean"] for s in values], yerr=_error_bars(values), fmt="o-",
                        capsize=3, label=variant)
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("non-embedding parameters N")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _interval(summary: dict[str, Any], digits: int) -> str:
    """`0.123 [0.101, 0.145]`, or the mean alone when there is no interval."""
    text = f"{summary['mean']:.{digits}f}"
    if summary["low"] is None or not math.isfinite(summary["mean"]):
        return text
    return f"{text} [{summary['low']:.{digits}f}, {summary['high']:.{digits}f}]"


def _markdown(report: dict[str, Any]) -> str:
    seeds = report.get("seeds", 1)
    lines = [
        f"# Sweep: scale `{report['scale']}`, {report['steps']} steps per run"
        + (f", {seeds} seeds" if seeds > 1 else ""),
        "",
        (
            "Validation loss per token in each head's units (diffusion: noise MSE plus the "
            "variance term; softmax: nats). Continuous and discrete losses do not compare; "
            "compare variants within a token kind."
        ),
        "",
    ]
    if seeds > 1:
        lines += [
            (f"Mean over {seeds} seeds and its {CONFIDENCE:.0%} Student-t interval, `mean "
             f"[low, high]` (mean +- t * s / sqrt({seeds}), s the seeds' standard deviation); "
             "seed k sets the initialisation, the data and the evaluation's sampling."),
            "",
            ("| variant | size | non-embedding params | seeds | validation loss | ShapesEval | "
             "Frechet | s/step |"),
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for a in report["aggregates"]:
            step = a["median_step_seconds"]
            lines.append(
                f"| {a['variant']} | {a['size']} | {a['non_embedding_parameters']:,} | "
                f"{a['validation_loss']['n']} | {_interval(a['validation_loss'], 4)} | "
                f"{_interval(a['shapes_eval'], 3)} | {_interval(a['frechet'], 3)}"
                f"{'*' if a['frechet_rough'] else ''} | "
                f"{'' if step is None else f'{step:.3f}'} |"
            )
        categories = list(dict.fromkeys(
            c for a in report["aggregates"] for c in a["shapes_eval_categories"]
        ))
        lines += ["", "ShapesEval per category, mean over seeds [interval]:", "",
                  "| variant | size | " + " | ".join(categories) + " |",
                  "|---|---|" + "---:|" * len(categories)]
        for a in report["aggregates"]:
            cells = [_interval(a["shapes_eval_categories"][c], 3)
                     if c in a["shapes_eval_categories"] else "" for c in categories]
            lines.append(f"| {a['variant']} | {a['size']} | " + " | ".join(cells) + " |")
        lines += ["", "Every run:", ""]
    lines += [
        "| variant | size | " + ("seed | " if seeds > 1 else "") + "non-embedding params | "
        "validation loss | ShapesEval | Frechet | s/step |",
        "|---|---|" + ("---:|" if seeds > 1 else "") + "---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        rough = "*" if r["frechet"]["rough"] else ""
        step = r.get("median_step_seconds")
        lines.append(
            f"| {r['variant']} | {r['size']} | "
            + (f"{r.get('seed', 0)} | " if seeds > 1 else "")
            + f"{r['non_embedding_parameters']:,} | "
            f"{r['validation']['loss']:.4f} | {r['shapes_eval']['overall']:.3f} | "
            f"{r['frechet']['distance']:.3f}{rough} | "
            f"{'' if step is None else f'{step:.3f}'} |"
        )
    if any(r["frechet"]["rough"] for r in report["runs"]):
        lines += ["", "\\* rough: fewer generated images than features."]
    lines += ["", "Power laws `L = a * N^(-alpha)` fitted in log-log space"
              + (" to the seed means; `alpha over seeds`: each seed's own fit, mean [interval]"
                 if seeds > 1 else "") + ":", ""]
    if seeds > 1:
        lines += ["| variant | a | alpha | alpha over seeds | with a floor (a, alpha, floor) |",
                  "|---|---:|---:|---:|---|"]
    else:
        lines += ["| variant | a | alpha | with a floor (a, alpha, floor) |", "|---|---:|---:|---|"]
    for variant, fit in report["fits"].items():
        floor = fit.get("with_floor")
        floor_text = "" if floor is None else (
            f"{floor['a']:.4g}, {floor['alpha']:.4f}, {floor['floor']:.4g}"
        )
        spread = f" {_interval(fit['alpha_over_seeds'], 4)} |" if seeds > 1 else ""
        lines.append(f"| {variant} | {fit['a']:.4g} | {fit['alpha']:.4f} |{spread} {floor_text} |")
    if seeds < 2:
        lines += ["", "One seed per run: no intervals (run `fluid sweep --seeds N` for them)."]
    lines += ["", "![loss](loss_vs_params.png)", "", "![metrics](metrics_vs_params.png)", ""]
    return "\n".join(lines)
