"""`fluid sweep`: the paper's four variants at several sizes on `shapes`, one step budget,
and validation loss against parameters fitted as a power law per variant, over one or more
seeds.

Every run is a `fluid.recipes` run in `<out>/<variant>-<size>/` (seed 0) or
`<out>/<variant>-<size>-seed<k>/` (seed k > 0) and is evaluated by `evaluate_checkpoint`, the
code of `fluid eval`, into its `eval/`. Seed k sets the model's initialisation and training
key (`TrainConfig.seed`), the data (`DataConfig.seed`: the `shapes` items, their order, the
images a palette is fitted to and, offset from it, the held-out set) and the evaluation's
prompts and sampling keys; seed 0 is a one-seed sweep's run, so adding seeds to a finished
sweep trains only the new ones. Over several seeds, `sweep.json` and `sweep.md` give per
(variant, size) the mean of each measure and its 95% Student-t interval (`mean_interval`),
and per variant the exponent fitted to each seed alone with its mean and interval
(`fluid/eval/_sweep_report.py`). A run whose
`eval/eval.json` is there for the same step budget and evaluation settings is not trained
or evaluated again; an interrupted one resumes from its checkpoint. So running the same
command again finishes a sweep, and adding a size or variant trains only the new runs.

The sweep trains, so it sits above the trainer (`fluid.train`), as `fluid eval` does not need
to: the rest of `fluid.eval` reads run folders through `fluid.run` alone.

Sizes are named by width and depth, `w<width>d<depth>` (`w128d4`); attention heads have
32 channels (one head below 64). Parameters are counted by `fluid.build.non_embedding_params`
on `abstract_model` (no weights allocated).
"""

import dataclasses
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._types import CONTINUOUS
from ..build import abstract_model, count_params, non_embedding_params
from ..config import TrainConfig, override, to_dict
from ..orders import ORDERS, RandomOrder
from ..presets import ALL_VARIANTS, VARIANTS, shapes
from ..recipes import prepare
from ..run import CheckpointManager, EvalReport, RunFolder, check_config, read_metrics
from ..tokenizers import TOKENIZERS
from ._evaluate import evaluate_checkpoint
from ._sweep_report import CONFIDENCE, summarise, write_report


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepScale:
    """One setting of a sweep: data, sizes, budget and evaluation.

    - `image_size`, `patch_size`: `shapes` images and their patch tokens.
    - `sizes`: default sizes, `w<width>d<depth>`.
    - `steps`, `batch_size`, `learning_rate`, `warmup_steps`: the training budget.
    - `lr_schedule_continuous`, `lr_schedule_discrete`: the learning-rate schedule after
      warm-up by token kind, as the Fluid paper trains: constant for continuous tokens,
      cosine (to zero at the last step) for discrete ones.
    - `lr_width_exponent`: the learning rate of a size of width `w` is `learning_rate *
      (w0 / w) ** lr_width_exponent`, `w0` the width of the scale's first size. 0 (the
      default, the paper's): one rate for every size; 1 scales it as 1 / width (muP's rule
      for hidden matrices under Adam), to test whether one rate favours some sizes.
    - `mask_schedule`: how random-order variants draw the masked fraction in training
      (`RandomOrder.mask_schedule`): `"cosine"` over [0, 1] as Fluid (the default), or
      `"mar"` (at least 70% masked, as MAR). Validation scores each model at quantiles of
      its own draw (`fluid.eval.validation_mask_ratios`).
    - `head_depth`, `head_batch_mul`: diffusion head depth and timesteps drawn per token in
      training; its width is the model's, and at least `head_min_width` (a head narrower
      than the 48 values of a 4 x 4 pixel patch is a bottleneck that no backbone size
      lifts).
    - `noise_shift`: the diffusion head's noise-schedule shift (see `fluid.presets.demo`: a
      flat 4 x 4 patch averages its noise down by 4, and without the shift the head rarely
      needs the backbone's condition, so short runs learn little from the caption).
    - `text_dim`, `text_depth`: the learned text encoder, the same for every size.
    - `vocab_size`: palette codebook of the discrete variants.
    - `object_scale`, `layout`, `categories`, `style`: `shapes` options (see
      `ShapesDataset`); `categories=None` trains on all six; `style="shaded"` draws images
      that a palette of discrete colours cannot reproduce exactly.
    - `sample_temperature`: sampling temperature of the evaluation.
    - `samples`, `validation_examples`, `min_count`: evaluation (see `fluid.eval.evaluate`).
    - `fit_images`: images the palette codebook is fitted to.
    - `seeds`: runs per (variant, size), seeds `0, ..., seeds - 1`.
    """

    image_size: int = 32
    patch_size: int = 4
    sizes: tuple[str, ...]
    steps: int
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    lr_schedule_continuous: str = "constant"
    lr_schedule_discrete: str = "cosine"
    lr_width_exponent: float = 0.0
    mask_schedule: str = "cosine"
    head_depth: int = 2
    head_batch_mul: int = 4
    head_min_width: int = 64
    noise_shift: float = 4.0
    text_dim: int = 64
    text_depth: int = 1
    vocab_size: int = 512
    object_scale: float = 1.0
    layout: str = "random"
    categories: tuple[str, ...] | None = None
    style: str = "flat"
    sample_temperature: float = 1.0
    samples: int = 192
    validation_examples: int = 256
    min_count: int | None = None
    fit_images: int = 2048
    seeds: int = 1


SCALES: dict[str, SweepScale] = {
    # For tests and smoke runs: 16 px, seconds per run; the Frechet distance of 12 images
    # is rough (accepted by min_count).
    "tiny": SweepScale(
        image_size=16, sizes=("w16d1", "w32d2"), steps=4, batch_size=8, warmup_steps=2,
        head_depth=1, head_batch_mul=2, head_min_width=16, text_dim=32, vocab_size=32,
        samples=12,
        validation_examples=16, min_count=2, fit_images=16,
    ),
    # The default: 4 variants x 3 sizes x 3 seeds x 200 steps on 32 px shapes, sizes
    # spanning 11.8x (continuous) to 20x (discrete) in non-embedding parameters. Measured
    # on an idle 2-core CPU (session 14, `time fluid sweep`): 40 minutes in all, 36 runs.
    # 96 samples per run: the Frechet distance of 96
    # 191-dimensional features is rough (min_count), compared at equal N across the grid;
    # ShapesEval's interval comes from the seeds. Objects are placed near fixed slots and
    # drawn larger, captions come from the colour categories, and the diffusion head's
    # noise is shifted, as in the demo, so that minutes of training show in the samples;
    # the diffusion head draws 2 timesteps per token in training instead of MAR's 4.
    "small": SweepScale(
        sizes=("w32d2", "w64d2", "w128d4"), steps=200, head_batch_mul=2, object_scale=1.6,
        layout="slots", categories=("colors", "color_attr"), sample_temperature=0.8,
        samples=96, min_count=96, validation_examples=128, fit_images=512, seeds=3,
    ),
    # Hours on a CPU, minutes on a GPU.
    "medium": SweepScale(
        sizes=("w128d4", "w192d6", "w256d8", "w384d10"), steps=4000, warmup_steps=100,
        head_depth=3, text_dim=128, text_depth=2, samples=384, validation_examples=512,
    ),
    # A GPU's: 6 sizes over two decades of parameters.
    "large": SweepScale(
        sizes=("w128d4", "w192d6", "w256d8", "w384d12", "w512d16", "w768d20"), steps=20000,
        batch_size=128, learning_rate=5e-4, warmup_steps=500, head_depth=3, text_dim=256,
        text_depth=2, samples=1024, validation_examples=1024,
    ),
}


def scale_setting(scale: str, options: dict[str, Any] | None = None) -> SweepScale:
    """The `SweepScale` named `scale`, with the fields of `options` changed."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; scales are {sorted(SCALES)}.")
    fields = {f.name for f in dataclasses.fields(SweepScale)}
    unknown = sorted(set(options or {}) - fields)
    if unknown:
        raise ValueError(f"unknown sweep settings {unknown}; settings are {sorted(fields)}.")
    return dataclasses.replace(SCALES[scale], **(options or {}))


def parse_size(size: str) -> tuple[int, int, int]:
    """`(width, depth, heads)` of a size name `w<width>d<depth>`: heads of 32 channels, one
    below 64."""
    match = re.fullmatch(r"w(\d+)d(\d+)", size)
    if match is None:
        raise ValueError(f"a size is named w<width>d<depth> (w128d4), got {size!r}.")
    width, depth = int(match[1]), int(match[2])
    heads = max(1, width // 32)
    if width % heads or depth < 1:
        raise ValueError(
            f"size {size!r}: the width must be a multiple of 32 (or below 64) and depth >= 1."
        )
    return width, depth, heads


def sweep_config(
    variant: str, size: str, scale: SweepScale, *, steps: int | None = None, seed: int = 0
) -> TrainConfig:
    """The `TrainConfig` of one run of a sweep: the `shapes-<variant>` preset resized.

    **Arguments:**

    - `variant`: one of `fluid.presets.ALL_VARIANTS` (the paper's four and the cached
      random-order ones).
    - `size`: `w<width>d<depth>`.
    - `scale`: the sweep's setting.
    - `steps`: the step budget, `scale.steps` by default.
    - `seed`: the run's `seed` and `data.seed` (0 is the presets' own).

    EMA weights are evaluated; their decay is `1 - 10 / steps` (clipped to [0.9, 0.9999]),
    an average over the last tenth of the run whatever its length. The learning rate, its
    schedule and the random order's mask schedule follow the scale (`SweepScale`).
    """
    if variant not in ALL_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; variants are {ALL_VARIANTS}.")
    width, depth, heads = parse_size(size)
    steps = scale.steps if steps is None else steps
    config = shapes(variant)
    # The tokenizer's declared token kind says which head's settings the scale fills in.
    continuous = TOKENIZERS.get(config.model.tokenizer.name).token_kind == CONTINUOUS
    first_width = parse_size(scale.sizes[0])[0]
    learning_rate = scale.learning_rate * (first_width / width) ** scale.lr_width_exponent
    values: dict[str, Any] = {
        "model.tokenizer.image_size": scale.image_size,
        "model.tokenizer.patch_size": scale.patch_size,
        "model.width": width,
        "model.backbone.depth": depth,
        "model.backbone.num_heads": heads,
        "model.aligner_heads": heads,
        "model.text_encoder.dim": scale.text_dim,
        "model.text_encoder.depth": scale.text_depth,
        "model.text_encoder.num_heads": max(1, scale.text_dim // 32),
        "data.image_size": scale.image_size,
        "data.object_scale": scale.object_scale,
        "data.layout": scale.layout,
        "data.categories": scale.categories,
        "data.style": scale.style,
        "sample_temperature": scale.sample_temperature,
        "data.fit_images": scale.fit_images,
        "optim.learning_rate": learning_rate,
        "optim.schedule": scale.lr_schedule_continuous if continuous
        else scale.lr_schedule_discrete,
        "optim.warmup_steps": min(scale.warmup_steps, steps),
        "optim.ema_decay": min(max(1.0 - 10.0 / steps, 0.9), 0.9999),
        "steps": steps,
        "batch_size": scale.batch_size,
        "log_every": max(1, min(25, steps // 4)),
        "checkpoint_every": 0,
        "seed": seed,
        "data.seed": seed,
    }
    if continuous:
        values["model.head.width"] = max(width, scale.head_min_width)
        values["model.head.noise_shift"] = scale.noise_shift
        values["model.head.depth"] = scale.head_depth
        values["model.head.batch_mul"] = scale.head_batch_mul
    else:
        values["model.tokenizer.vocab_size"] = scale.vocab_size
    if issubclass(ORDERS.get(config.model.order.name), RandomOrder):
        values["model.order.mask_schedule"] = scale.mask_schedule
    for key, value in values.items():
        config = override(config, key, value)
    return config


def sweep_run_name(variant: str, size: str, seed: int = 0) -> str:
    """The folder of one run in a sweep: `<variant>-<size>`, and `-seed<k>` after it for
    seed k > 0 (so a one-seed sweep's folders are seed 0's)."""
    return f"{variant}-{size}" + (f"-seed{seed}" if seed else "")


def _model_size(config: TrainConfig) -> dict[str, int]:
    model = abstract_model(config.model)
    return {
        "parameters": count_params(model),
        "non_embedding_parameters": non_embedding_params(model),
    }


def _finished(run: RunFolder, steps: int, settings: dict[str, Any]) -> dict[str, Any] | None:
    path = EvalReport(run.eval).result
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    # Runs from before seeds existed were evaluated with seed 0 and did not record it.
    same = result.get("step") == steps and {"seed": 0, **result.get("settings", {})} == settings
    return result if same else None


def _complete_steps(run: RunFolder) -> list[int]:
    if not run.checkpoints.is_dir():
        return []
    with CheckpointManager(run.checkpoints, keep=None) as manager:
        return manager.all_steps()


def _step_times(run: RunFolder) -> dict[str, float]:
    """Median step time of a run's log (the first step, which compiles, left out)."""
    times = [record["step_time"] for record in read_metrics(run.metrics)]
    return {"median_step_seconds": float(np.median(times[1:] or times))} if times else {}


def run_one(
    variant: str,
    size: str,
    scale: SweepScale,
    out: str | Path,
    *,
    seed: int = 0,
    steps: int | None = None,
    samples: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume) one run of a sweep and evaluate it; a finished run is read back.

    `seed` is the run's training, data and evaluation seed; its folder is
    `sweep_run_name(variant, size, seed)` in `out`.

    **Returns:**

    Its `eval.json` dict, with `variant`, `size`, `seed`, `settings` and step times added.
    """
    config = sweep_config(variant, size, scale, steps=steps, seed=seed)
    run = RunFolder(Path(out) / sweep_run_name(variant, size, seed))
    if run.config.exists():
        # A run of another setting (an older sweep's mask or learning-rate schedule, say)
        # is never reused as this one: its results would be silently wrong.
        check_config(json.loads(run.config.read_text()), to_dict(config), source=str(run.root))
    report = EvalReport(run.eval)
    settings = {
        "samples": scale.samples if samples is None else samples,
        "validation_examples": scale.validation_examples,
        "min_count": scale.min_count,
        "seed": seed,
    }
    done = _finished(run, config.steps, settings)
    if done is not None:
        if progress:
            print(f"{run.root.name}: finished earlier, reusing {report.result}")
        return {**done, "seed": seed}
    checkpoint = run.checkpoint(config.steps)
    t0 = time.perf_counter()
    if config.steps not in _complete_steps(run):
        if progress:
            print(f"{run.root.name}: training {config.steps} steps")
        recipe = prepare(config, out_dir=run.root, progress=progress)
        if recipe.step > config.steps:
            raise ValueError(
                f"{run.root} holds a run past {config.steps} steps (at {recipe.step}); sweep into "
                "another --out or use --steps of at least that."
            )
        recipe.run()
        del recipe
    t1 = time.perf_counter()
    if progress:
        print(f"{run.root.name}: evaluating {checkpoint}")
    result = evaluate_checkpoint(
        checkpoint, out=report.root, samples=settings["samples"],
        validation_examples=settings["validation_examples"], min_count=settings["min_count"],
        seed=seed, progress=progress,
    )
    result.update(
        variant=variant, size=size, seed=seed, settings=settings,
        train_seconds=t1 - t0, eval_seconds=time.perf_counter() - t1, **_step_times(run),
    )
    report.result.write_text(json.dumps(result, indent=1))
    return result


def run_sweep(
    out: str | Path,
    *,
    scale: str = "small",
    variants: Sequence[str] = VARIANTS,
    sizes: Sequence[str] | None = None,
    steps: int | None = None,
    samples: int | None = None,
    seeds: int | None = None,
    options: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and evaluate every (variant, size) for each seed, fit the power laws, write
    the report.

    **Arguments:**

    - `out`: the sweep's directory: one run directory per (variant, size, seed)
      (`sweep_run_name`), and `sweep.json`, `sweep.md`, `loss_vs_params.png` and
      `metrics_vs_params.png`.
    - `scale`: a name of `SCALES`.
    - `variants`: which of `fluid.presets.ALL_VARIANTS` (the paper's four by default).
    - `sizes`: `w<width>d<depth>` names; the scale's by default.
    - `steps`, `samples`: override the scale's step budget and evaluation samples.
    - `seeds`: runs per (variant, size), seeds `0, ..., seeds - 1`; the scale's (1) by
      default. Seed 0 of every run is trained before seed 1 of any.
    - `options`: fields of the scale's `SweepScale` to change (`{"mask_schedule": "mar"}`),
      recorded in the report's `setting`.
    - `progress`: print progress and show progress bars.

    **Returns:**

    The dict written to `sweep.json`: `runs` (one dict per run, with its `seed` and its
    size counted by `non_embedding_params`); `aggregates`, one per (variant, size) in the
    order of `variants` and `sizes`: its `seeds` and, for `validation_loss`, `shapes_eval`
    (overall), each of `shapes_eval_categories` and `frechet` (the distance), the mean over
    seeds with its 95% Student-t interval, `{"mean", "low", "high", "n"}` (`low` and `high`
    are `None` for one seed: no interval); and `fits`, per variant with two or more sizes:
    `{"a", "alpha"}` fitted to the seed means (and `with_floor` with four or more sizes),
    `seeds` (each seed's own `{"seed", "a", "alpha"}`) and `alpha_over_seeds` (the mean
    and interval of those exponents).
    """
    setting = scale_setting(scale, options)
    sizes = list(sizes or setting.sizes)
    seeds = setting.seeds if seeds is None else seeds
    if seeds < 1:
        raise ValueError(f"a sweep runs one or more seeds, got seeds={seeds}.")
    unknown = [v for v in variants if v not in ALL_VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; variants are {ALL_VARIANTS}.")
    out = Path(out)
    counted = {}
    for v in variants:
        for s in sizes:
            # Every run is built (abstractly) before any trains: a size a variant cannot take
            # stops the sweep now, not hours in.
            try:
                counted[(v, s)] = _model_size(sweep_config(v, s, setting, steps=steps))
            except ValueError as error:
                raise ValueError(
                    f"the sweep cannot build {v} at size {s}: {error} Leave that size out "
                    "(--sizes) or that variant (--variants)."
                ) from None
    if progress:
        for (v, s), count in counted.items():
            print(f"{v:<18} {s:<8} {count['non_embedding_parameters']:>12,} non-embedding "
                  "parameters")
    t0 = time.perf_counter()
    runs = []
    for seed in range(seeds):
        for variant in variants:
            for size in sizes:
                result = run_one(variant, size, setting, out, seed=seed, steps=steps,
                                 samples=samples, progress=progress)
                runs.append({**result, **counted[(variant, size)]})
    aggregates, fits = summarise(runs)
    report = {
        "scale": scale,
        "setting": dataclasses.asdict(setting),
        "steps": steps or setting.steps,
        "variants": list(variants),
        "sizes": sizes,
        "seeds": seeds,
        "confidence": CONFIDENCE,
        "runs": runs,
        "aggregates": aggregates,
        "fits": fits,
        "seconds": time.perf_counter() - t0,
    }
    write_report(report, out)
    return report
