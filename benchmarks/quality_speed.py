"""Fast sampling at equal quality: every sampling switch of a trained model alone, and the best
combination of them, as images per second against ShapesEval and the Frechet distance.

    python benchmarks/quality_speed.py --run fluid_demo --seeds 3 --samples 64 --min-count 2
    python benchmarks/quality_speed.py --train demo --steps 300 --seeds 3 --samples 64 \\
        --min-count 2                                   # trains the model itself first
    python benchmarks/quality_speed.py --run fluid_demo --only baseline head-steps-25

The model: a trained run (`--run`, a folder `fluid demo` or `fluid train` wrote, read by
`fluid.run.load_model`), or one trained here at a fixed budget (`--train PRESET --steps N`,
through `fluid.recipes.prepare`, into `--train-out` or a temporary folder; `--steps 0` saves
the untrained model). It samples with its run's settings (`sample_steps`, `sample_cfg`,
`sample_temperature`); the switches (`FluidModel.generate`, `fluid.model.sampling_switches`):

- `baseline`: every switch off, the run's defaults (the head's own chain, plain guidance);
- `head-steps-H/2`, `head-steps-H/4`: a shorter chain for an iterative head of `H` steps;
- `ddim-H/4` (a diffusion head sampling by DDPM): DDIM (`eta = 0`) on the chain of `H/4`;
  `heun`/`euler` (a flow head): the other solver at the head's own steps;
- `disa`: a DiSA schedule over progress, `annealed_steps(H/2, H/20, 4)` (50, 35, 20, 5 at
  `H = 100`);
- `cfg-interval-0-0.5`, `cfg-interval-0.5-1`: guidance at half of the steps, by progress;
- `cfg-refresh-2`, `cfg-refresh-4`: LazyMAR's reuse of the guidance residual;
- `combination`: per family (the head's chain, the guidance interval, the refresh), the
  fastest setting that keeps quality (the rule below), all together, when two families or
  more have one.

A switch the model cannot take is skipped with the reason `sampling_switches` gives (its
`ConfigError`), as are the guidance switches of a model sampled without guidance.

Speed: each setting's jitted sampler is compiled by one untimed call, then every call that
makes its quality images is timed (`generate_images`, which blocks on its result): the median
over seeds is its images/s. The settings take turns, in a rotated order at each seed, so a
change of the machine's load hits them alike. The combination, chosen after the others, is
timed alternately with the baseline again and its speed-up is against that baseline run.

Quality: `--seeds K` seeds of `--samples N` images each (N rounded up to a whole number per
category; seed `s` draws the prompts `ShapesEval().prompts(N / categories, seed=s)` and
samples with `seed=s`, the same for every setting): ShapesEval's accuracy per category and
overall, and the Frechet distance of the images' `ShapesFeatures` to the data's cached
reference statistics (`shapes_reference_stats`, the run's data options). Below 192 images the
distance needs `--min-count` (it is then rough: the covariance of fewer samples than features
is singular, which biases the distance up; it still compares settings at the same N). Each
figure's mean over seeds comes with its 95% Student-t interval (`mean_interval`).

The rule for keeping quality, and so for the best setting: a setting keeps quality when it
is not worse than the baseline, one-sided (`keeps_quality`): its overall ShapesEval
interval reaches the baseline's lower end and its Frechet interval reaches down to the
baseline's upper end; the best is the fastest setting that keeps quality. A setting better
than the baseline keeps it (a two-sided overlap, `within_baseline` in the JSON, would
refuse it). It is a lenient test at few seeds: the intervals and the per-seed figures are
in the JSON to judge by.

Output: `results/quality_speed_<name>.json`, a markdown table on stdout, and
`results/quality_speed_<name>.png` (overall ShapesEval against images/s, and the Frechet
distance against images/s, one labelled point per setting with its interval).
"""

import argparse
import dataclasses
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, conditions, finish, replace_fields, write_json

from fluid._errors import ConfigError
from fluid.eval import (
    ShapesEval,
    ShapesFeatures,
    feature_stats,
    generate_images,
    mean_interval,
    shapes_reference_stats,
)
from fluid.eval._evaluate import GENERATION_BATCH
from fluid.eval._frechet import required_count
from fluid.heads import AbstractIterativeHead, DiffusionHead, FlowHead, annealed_steps
from fluid.model import sampling_switches

RULE = ("keeps quality: not worse than the baseline, one-sided, by the 95% intervals over "
        "seeds (overall ShapesEval's reaches the baseline's low end, the Frechet distance's "
        "its high end); best: the fastest setting that keeps quality")
FAMILIES = ("head", "cfg_interval", "cfg_refresh")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way of sampling: the switches of `FluidModel.generate` and, for `head_sampler`,
    the head's sampler (`("ddim", eta)` for a diffusion head, a solver name for a flow head)."""

    name: str
    family: str | None = None  # None: the baseline and the combination
    head_steps: int | tuple[int, ...] | None = None
    head_sampler: tuple[str, float] | str | None = None
    cfg_interval: tuple[float, float] | None = None
    cfg_refresh: int | None = None

    def switches(self) -> dict[str, Any]:
        return {"head_steps": self.head_steps, "cfg_interval": self.cfg_interval,
                "cfg_refresh": self.cfg_refresh}

    def describe(self) -> dict[str, Any]:
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.switches().items()}
        out["head_sampler"] = (list(self.head_sampler) if isinstance(self.head_sampler, tuple)
                               else self.head_sampler)
        return out


def candidate_settings(model) -> list[Setting]:
    """Every setting of the module docstring for `model`'s head (before checking them)."""
    head = model.head
    out = [Setting("baseline")]
    if isinstance(head, AbstractIterativeHead):
        h = head.sampling_steps
        out += [Setting(f"head-steps-{max(1, h // d)}", "head", head_steps=max(1, h // d))
                for d in (2, 4)]
    else:  # sampling_switches says why these are refused
        out += [Setting("head-steps-50", "head", head_steps=50),
                Setting("head-steps-25", "head", head_steps=25)]
    if isinstance(head, DiffusionHead) and head.sampler == "ddpm":
        q = max(1, head.sampling_steps // 4)
        out.append(Setting(f"ddim-{q}", "head", head_steps=q, head_sampler=("ddim", 0.0)))
    elif isinstance(head, FlowHead):
        other = "euler" if head.solver == "heun" else "heun"
        out.append(Setting(other, "head", head_sampler=other))
    h = getattr(head, "sampling_steps", 100)
    out.append(Setting("disa", "head",
                       head_steps=annealed_steps(max(2, h // 2), max(1, h // 20), 4)))
    out += [Setting("cfg-interval-0-0.5", "cfg_interval", cfg_interval=(0.0, 0.5)),
            Setting("cfg-interval-0.5-1", "cfg_interval", cfg_interval=(0.5, 1.0)),
            Setting("cfg-refresh-2", "cfg_refresh", cfg_refresh=2),
            Setting("cfg-refresh-4", "cfg_refresh", cfg_refresh=4)]
    return out


def refusal(model, config, setting: Setting) -> str | None:
    """Why `model` cannot sample with `setting`, or None if it can."""
    if setting.head_sampler is not None and not isinstance(model.head, DiffusionHead | FlowHead):
        return f"the head {type(model.head).__name__} has no other sampler"
    guidance = setting.cfg_interval is not None or setting.cfg_refresh is not None
    if guidance and config.sample_cfg == 1.0:
        return "the run samples without guidance (sample_cfg = 1): nothing to skip"
    try:
        sampling_switches(model.head, cfg=config.sample_cfg, backbone=model.backbone,
                          **setting.switches())
    except ConfigError as error:
        return str(error)
    return None


def with_sampler(model, setting: Setting):
    """`model` with its head's sampler as `setting` asks (the same weights)."""
    if setting.head_sampler is None:
        return model
    if isinstance(model.head, DiffusionHead):
        sampler, eta = setting.head_sampler
        return replace_fields(model, DiffusionHead, sampler=sampler, eta=eta)
    return replace_fields(model, FlowHead, solver=setting.head_sampler)


def combine(name: str, settings: list[Setting]) -> Setting:
    """One setting with the switches of `settings` (at most one per family)."""
    fields: dict[str, Any] = {}
    for s in settings:
        for key in ("head_steps", "head_sampler", "cfg_interval", "cfg_refresh"):
            if getattr(s, key) is not None:
                fields[key] = getattr(s, key)
    return Setting(name, None, **fields)


def interval(values: list[float]) -> dict[str, Any]:
    mean, lo, hi = mean_interval(np.asarray(values, np.float64))
    return {"mean": mean, "low": lo, "high": hi, "per_seed": [float(v) for v in values]}


def overlaps(a: dict, b: dict) -> bool:
    return a["low"] <= b["high"] and b["low"] <= a["high"]


class Bench:
    """The model, its prompts per seed, the judge and the reference statistics; `generate`
    samples one setting at one seed and times it."""

    def __init__(self, model, text_tokenizer, config, *, samples: int, seeds: int,
                 min_count: int | None, batch_size: int):
        from fluid.data.shapes import CATEGORIES, shapes_options

        self.model, self.text_tokenizer, self.config = model, text_tokenizer, config
        data = config.data
        self.categories = tuple(data.categories) if data.categories else CATEGORIES
        self.judge = ShapesEval()
        per_category = max(1, math.ceil(samples / len(self.categories)))
        self.prompts = [self.judge.prompts(per_category, seed=s, categories=self.categories)
                        for s in range(seeds)]
        self.samples = len(self.prompts[0])
        self.batch_size = min(batch_size, self.samples)
        self.extractor = ShapesFeatures()
        dims = self.extractor(np.zeros((1, data.image_size, data.image_size, 3),
                                       np.float32)).shape[1]
        if self.samples < required_count(dims, min_count):
            raise ConfigError(
                f"{self.samples} images per seed are too few for the Frechet distance of "
                f"{dims} ShapesFeatures (it needs {required_count(dims, min_count)}): raise "
                "--samples, or pass --min-count to accept a rough distance knowingly."
            )
        self.frechet = {"features": dims, "min_count": min_count,
                        "rough": self.samples <= dims, "samples": self.samples}
        self.reference = shapes_reference_stats(data.image_size, **shapes_options(data))
        self.min_count = min_count

    def generate(self, setting: Setting, seed: int) -> tuple[np.ndarray, float]:
        c = self.config
        t0 = time.perf_counter()
        images = generate_images(
            with_sampler(self.model, setting), self.text_tokenizer, self.prompts[seed],
            text_len=c.model.text_len, seed=seed, steps=c.sample_steps, cfg=c.sample_cfg,
            temperature=c.sample_temperature, batch_size=self.batch_size, progress=False,
            **setting.switches(),
        )
        return images, time.perf_counter() - t0

    def score(self, images: np.ndarray, seed: int) -> dict[str, Any]:
        scores = self.judge.score(images, self.prompts[seed])
        stats = feature_stats(self.extractor, images, min_count=self.min_count)
        return {"overall": float(scores["overall"]),
                "categories": {k: float(v) for k, v in scores["categories"].items()},
                "frechet": float(stats.distance(self.reference))}


def measure(bench: Bench, settings: list[Setting], seeds: int, *,
            log=print) -> dict[str, dict[str, Any]]:
    """Compile each setting (one untimed call), then make every seed's images of every
    setting, the settings in an order rotated by one at each seed; per setting its timed
    calls, compile call and per-seed scores."""
    rows: dict[str, dict[str, Any]] = {}
    for s in settings:
        _, first = bench.generate(s, 0)
        rows[s.name] = {"setting": s, "first_call_s": first, "times": [], "scores": [],
                        "images": []}
        log(f"  compiled {s.name} (first call {first:.1f} s)")
    for seed in range(seeds):
        shift = seed % len(settings)
        for s in settings[shift:] + settings[:shift]:
            images, seconds = bench.generate(s, seed)
            row = rows[s.name]
            row["times"].append(seconds)
            row["scores"].append(bench.score(images, seed))
            row["images"].append(images)
            log(f"  seed {seed} {s.name:>20}: {seconds:6.2f} s, ShapesEval "
                f"{row['scores'][-1]['overall']:.3f}, FD {row['scores'][-1]['frechet']:.2f}")
    return rows


def summarise(row: dict[str, Any], samples: int, categories) -> dict[str, Any]:
    s: Setting = row["setting"]
    median = statistics.median(row["times"])
    return {
        "name": s.name, "family": s.family, "switches": s.describe(),
        "images_per_s": samples / median, "seconds_median": median,
        "seconds": row["times"], "first_call_s": row["first_call_s"],
        "shapes_eval": {
            "overall": interval([r["overall"] for r in row["scores"]]),
            "categories": {c: interval([r["categories"][c] for r in row["scores"]])
                           for c in categories},
        },
        "frechet": interval([r["frechet"] for r in row["scores"]]),
    }


def keeps_quality(row: dict, baseline: dict) -> bool:
    """Not worse than the baseline, one-sided: its overall ShapesEval interval reaches the
    baseline's lower end (higher is better), and its Frechet interval reaches down to the
    baseline's upper end (lower is better). A setting better than the baseline keeps
    quality; a two-sided overlap would have refused it (`within_baseline`)."""
    return (row["shapes_eval"]["overall"]["high"] >= baseline["shapes_eval"]["overall"]["low"]
            and row["frechet"]["low"] <= baseline["frechet"]["high"])


def within_baseline(row: dict, baseline: dict) -> bool:
    """Both intervals overlap the baseline's: neither worse nor better, by this run."""
    return (overlaps(row["shapes_eval"]["overall"], baseline["shapes_eval"]["overall"])
            and overlaps(row["frechet"], baseline["frechet"]))


def combination_of(rows: list[dict]) -> list[str]:
    """Per family (`FAMILIES`), the fastest setting that keeps quality, in family order: what
    the combination puts together (it is tried when two families or more have one)."""
    picks = []
    for family in FAMILIES:
        kept = [r for r in rows if r["family"] == family and r["keeps_quality"]]
        if kept:
            picks.append(max(kept, key=lambda r: r["images_per_s"])["name"])
    return picks


def load_or_train(args) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The model, its text tokenizer, its config, and where it came from."""
    from fluid.run import find_weights, load_model

    if args.run is not None:
        weights = find_weights(args.run)
        model, tok, config = load_model(weights)
        return model, tok, config, {"run": str(args.run), "weights": str(weights.path),
                                    "step": weights.step}
    from fluid.presets import get_config
    from fluid.recipes import prepare

    out = Path(args.train_out or tempfile.mkdtemp(prefix=f"quality_speed_{args.train}_"))
    config = get_config(args.train, steps=max(args.steps, 1))
    recipe = prepare(config, out_dir=out, resume=False, progress=False)
    t0 = time.perf_counter()
    if args.steps > 0:
        recipe.run(args.steps)
    seconds = time.perf_counter() - t0
    recipe.save()
    weights = find_weights(out)
    model, tok, config = load_model(weights)
    return model, tok, config, {"train": args.train, "steps": args.steps, "out": str(out),
                                "train_seconds": seconds, "weights": str(weights.path)}


def _uptime() -> str:
    """`uptime`'s line: the load of the machine, which other users share."""
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _ci(x: dict, digits: int = 3) -> str:
    return f"{x['mean']:.{digits}f} [{x['low']:.{digits}f}, {x['high']:.{digits}f}]"


def table(result: dict) -> str:
    cats = result["categories"]
    lines = ["| setting | images/s | speed-up | ShapesEval overall | "
             + " | ".join(cats) + " | Frechet distance | keeps quality |",
             "|---|---|---|---|" + "---|" * len(cats) + "---|---|"]
    for r in result["settings"]:
        lines.append(
            f"| {r['name']} | {r['images_per_s']:.2f} | {r['speedup']:.2f}x | "
            f"{_ci(r['shapes_eval']['overall'])} | "
            + " | ".join(f"{r['shapes_eval']['categories'][c]['mean']:.3f}" for c in cats)
            + f" | {_ci(r['frechet'], 2)} | {'yes' if r['keeps_quality'] else 'no'} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in ((axes[0], "shapes_eval", "ShapesEval overall (higher is better)"),
                           (axes[1], "frechet", "Frechet distance (lower is better)")):
        for r in result["settings"]:
            x = r[key]["overall"] if key == "shapes_eval" else r[key]
            color = "tab:red" if r["name"] == "baseline" else (
                "tab:green" if r["keeps_quality"] else "tab:gray")
            ax.errorbar(r["images_per_s"], x["mean"],
                        yerr=[[x["mean"] - x["low"]], [x["high"] - x["mean"]]],
                        fmt="o", color=color, capsize=3)
            ax.annotate(r["name"], (r["images_per_s"], x["mean"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel("images/s (median over seeds)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['name']}: {result['seeds']} seeds x {result['samples']} images, "
                 "95% t intervals (green: keeps quality, red: baseline)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a trained run's folder (or a checkpoint)")
    src.add_argument("--train", metavar="PRESET", help="train this preset here first")
    p.add_argument("--steps", type=int, default=300, help="training steps with --train")
    p.add_argument("--train-out", help="folder of the run --train writes (default: a temp one)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--samples", type=int, default=64, help="images per seed")
    p.add_argument("--min-count", type=int, default=None,
                   help="fewest images the Frechet distance accepts (rough below 192)")
    p.add_argument("--batch-size", type=int, default=GENERATION_BATCH)
    p.add_argument("--only", nargs="+", help="these settings alone (baseline always runs)")
    p.add_argument("--name", help="results name (default: the run folder's or preset's)")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.seeds < 2:
        p.error("--seeds must be at least 2 (an interval over seeds needs two)")
    return args


def main(argv=None, *, keep_images: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to the JSON (and, with `keep_images`, each
    setting's images per seed under `"images"`, which the JSON leaves out)."""
    args = parse_args(argv)
    info = conditions()
    info["uptime_start"] = _uptime()
    info["arguments"] = vars(args)
    model, tok, config, source = load_or_train(args)
    name = args.name or (Path(args.run).resolve().name if args.run else args.train)
    bench = Bench(model, tok, config, samples=args.samples, seeds=args.seeds,
                  min_count=args.min_count, batch_size=args.batch_size)

    settings, skipped = [], []
    for s in candidate_settings(model):
        if args.only and s.name != "baseline" and s.name not in args.only:
            continue
        why = refusal(model, config, s)
        if why is None:
            settings.append(s)
        else:
            skipped.append({"name": s.name, "switches": s.describe(), "reason": why})
            print(f"skipped {s.name}: {why}")
    print(f"{name}: {len(settings)} settings, {args.seeds} seeds x {bench.samples} images")
    rows = measure(bench, settings, args.seeds)
    summaries = {k: summarise(r, bench.samples, bench.categories) for k, r in rows.items()}
    base = summaries["baseline"]
    for r in summaries.values():
        r["keeps_quality"] = keeps_quality(r, base)
        r["within_baseline"] = within_baseline(r, base)
        r["speedup"] = r["images_per_s"] / base["images_per_s"]
        r["timed_with"] = "singles"

    picks = combination_of(list(summaries.values()))
    combination = None
    if len(picks) >= 2:
        combo = combine("combination", [rows[n]["setting"] for n in picks])
        why = refusal(model, config, combo)
        if why is None:
            print(f"combination of {', '.join(picks)}: timed against the baseline again")
            again = measure(bench, [rows["baseline"]["setting"], combo], args.seeds)
            reps = [np.array_equal(a, b) for a, b in
                    zip(again["baseline"]["images"], rows["baseline"]["images"])]
            base2 = summarise(again["baseline"], bench.samples, bench.categories)
            c = summarise(again["combination"], bench.samples, bench.categories)
            c["keeps_quality"] = keeps_quality(c, base)
            c["within_baseline"] = within_baseline(c, base)
            c["speedup"] = c["images_per_s"] / base2["images_per_s"]
            c["timed_with"] = "baseline_again"
            c["of"] = picks
            summaries["combination"] = c
            rows["combination"] = again["combination"]
            combination = {"of": picks, "baseline_again_images_per_s": base2["images_per_s"],
                           "baseline_again_seconds": base2["seconds"],
                           "baseline_images_reproduced": all(reps)}
        else:
            skipped.append({"name": "combination", "switches": combo.describe(),
                            "reason": why})
    else:
        why = (f"fewer than two families have a setting that keeps quality ({picks or 'none'})")
        skipped.append({"name": "combination", "reason": why})
        print(f"skipped combination: {why}")
    kept = [r for r in summaries.values() if r["keeps_quality"]]
    best = max(kept, key=lambda r: r["speedup"])["name"]

    result = {
        "name": name, "source": source, "rule": RULE, "best": best,
        "model": {"head": type(model.head).__name__, "backbone": type(model.backbone).__name__,
                  "order": type(model.order).__name__, "seq_len": model.seq_len,
                  "head_sampling_steps": getattr(model.head, "sampling_steps", None)},
        "sampling": {"steps": config.sample_steps, "cfg": config.sample_cfg,
                     "temperature": config.sample_temperature},
        "seeds": args.seeds, "samples": bench.samples, "batch_size": bench.batch_size,
        "categories": list(bench.categories),
        "frechet": {**bench.frechet, "note": (
            "rough: fewer images than features, so the sample covariance is singular and the "
            "distance is biased up; compare settings at the same number of images only"
            if bench.frechet["rough"] else "full-rank sample covariance")},
        "timing": ("images/s = images per seed / median seconds of the timed generate_images "
                   "calls (one per seed, after one untimed compiling call), settings "
                   "alternated in a rotated order per seed; the combination is timed "
                   "alternately with the baseline again and its speed-up is against that"),
        "settings": list(summaries.values()), "skipped": skipped, "combination": combination,
    }
    info["uptime_end"] = _uptime()
    result["conditions"] = finish(info)
    out_dir = Path(args.out_dir)
    path = write_json(out_dir / f"quality_speed_{name}.json", result)
    print(table(result))
    print(f"rule: {RULE}\nbest: {best}\nFrechet: {result['frechet']['note']}")
    print(f"load: {info['uptime_start']} -> {info['uptime_end']}\nwrote {path}")
    if not args.no_plot:
        print(f"plot: {plot(result, out_dir / f'quality_speed_{name}.png')}")
    if keep_images:
        result = {**result, "images": {k: r["images"] for k, r in rows.items()}}
    return result


if __name__ == "__main__":
    main()
