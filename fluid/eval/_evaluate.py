"""`fluid eval`: the validation loss, ShapesEval scores and Frechet distance of one model.

The same code evaluates a checkpoint from the command line and every run of a sweep
(`run_sweep`), so their numbers compare.
"""

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.random as jr
import numpy as np
from tqdm.auto import tqdm

from .._errors import ConfigError
from ..model import sampling_switches
from ..run import EvalReport, RunFolder, find_weights, load_model
from ._frechet import (
    REFERENCE_COUNT,
    check_frechet_count,
    feature_stats,
    shapes_reference_stats,
)
from ._shapes_eval import ShapesEval
from ._shapes_features import ShapesFeatures
from ._validation import (
    NOISE_DRAWS,
    VALIDATION_EXAMPLES,
    validation_batches,
    validation_loss_terms,
    validation_summary,
)

# 32 prompts per category: the fewest images whose ShapesFeatures (191 of them) have a
# full-rank sample covariance, as the Frechet distance needs.
DEFAULT_SAMPLES = 192
# Images per generation call: every call has this shape, so generation compiles once.
GENERATION_BATCH = 64
# Images per category in the sample grid (one row per category).
GRID_PER_CATEGORY = 4


def _categories(data_config: Any) -> tuple[str, ...]:
    from ..data.shapes import CATEGORIES

    return tuple(data_config.categories) if data_config.categories else CATEGORIES


def generate_images(
    model: Any,
    text_tokenizer: Any,
    prompts: Sequence[str],
    *,
    text_len: int,
    seed: int = 0,
    steps: int = 16,
    cfg: float = 3.0,
    cfg_schedule: str | None = None,
    temperature: float = 1.0,
    batch_size: int = GENERATION_BATCH,
    progress: bool = True,
    cfg_interval: tuple[float, float] | None = None,
    head_steps: int | Sequence[int] | None = None,
    cfg_refresh: int | None = None,
) -> np.ndarray:
    """One image per prompt, in batches of one shape (the last padded), so one compilation.

    **Arguments:**

    - `model`, `text_tokenizer`, `text_len`: as `fluid.sample.sample_images`.
    - `prompts`: the captions.
    - `seed`: batch `b` is sampled with `fold_in(key(seed), b)`.
    - `steps`, `cfg`, `temperature`: sampling settings (a run's `sample_*`).
    - `cfg_schedule`: `"linear"` or `"constant"`; `None`: the model's
      `default_cfg_schedule` (constant for raster).
    - `batch_size`: images per call.
    - `progress`: show a progress bar.
    - `cfg_interval`, `head_steps`, `cfg_refresh`: fast-sampling switches
      (`FluidModel.generate`).

    **Returns:**

    `[len(prompts), h, w, 3]` images in [-1, 1].
    """
    from ..sample import sample_images

    prompts = list(prompts)
    batch_size = min(batch_size, len(prompts))
    out = []
    starts = range(0, len(prompts), batch_size)
    for b, start in enumerate(tqdm(starts, desc="generating", unit="batch", disable=not progress)):
        chunk = prompts[start : start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        images = sample_images(
            model, text_tokenizer, padded, text_len=text_len, key=jr.fold_in(jr.key(seed), b),
            steps=steps, cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature,
            cfg_interval=cfg_interval,
            head_steps=head_steps, cfg_refresh=cfg_refresh,
        )
        out.append(images[: len(chunk)])
    return np.concatenate(out)


def _check_frechet_count(samples: int, image_size: int, min_count: int | None) -> None:
    # Fail before generating rather than after: the covariance needs d + 1 samples.
    dims = ShapesFeatures()(np.zeros((1, image_size, image_size, 3), np.float32)).shape[1]
    check_frechet_count(samples, dims, ShapesFeatures.name, min_count, "samples",
                        f"the default samples, {DEFAULT_SAMPLES}, are enough")


def evaluate(
    model: Any,
    text_tokenizer: Any,
    config: Any,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    validation_examples: int = VALIDATION_EXAMPLES,
    noise_draws: int = NOISE_DRAWS,
    min_count: int | None = None,
    batch_size: int = GENERATION_BATCH,
    progress: bool = True,
    cfg_interval: tuple[float, float] | None = None,
    head_steps: int | Sequence[int] | None = None,
    cfg_refresh: int | None = None,
) -> tuple[dict[str, Any], np.ndarray, list[str]]:
    """Evaluate a model of a run on the built-in `shapes` data.

    Three measures: the validation loss on the run's held-out set (`validation_loss`);
    ShapesEval's GenEval-style accuracy of images generated, with the run's sampling
    settings (`sample_steps`, `sample_cfg`, `sample_temperature`), for
    `ShapesEval().prompts(...)` in the run's categories; and the Frechet distance between
    the `ShapesFeatures` of those images and of the data set's reference images
    (`shapes_reference_stats`, with the run's data options).

    **Arguments:**

    - `model`, `text_tokenizer`, `config`: as `fluid.run.load_model` returns them.
    - `samples`: images to generate, rounded up to a whole number per category. The
      Frechet distance needs at least 192 (one more than the 191 features).
    - `seed`: seed of the prompts, the generation and the validation keys.
    - `validation_examples`: size of the held-out set.
    - `noise_draws`: as for `validation_loss`.
    - `min_count`: fewest samples the Frechet distance accepts, for quick checks with fewer
      than 192 images; the distance is then rough (`frechet.rough` in the result).
    - `cfg_interval`, `head_steps`, `cfg_refresh`: fast-sampling switches for the
      generated images
      (`FluidModel.generate`), recorded under `sampling` in the result.
    - `batch_size`: images per generation call.
    - `progress`: show progress bars.

    **Returns:**

    `(result, images, prompts)`: a JSON-ready dict of every number, the generated images
    and their prompts.
    """
    from ..data.shapes import shapes_options

    data = config.data
    if data.dataset != "shapes":
        raise ConfigError(
            "without data, fluid eval scores runs on the built-in shapes data set (its "
            f"held-out set, ShapesEval and Frechet reference); this run trained on "
            f"{data.dataset!r}: evaluate it on your pairs (data, --data PATH) or prompts "
            "(prompts, --prompts FILE) instead."
        )
    # Refused before the validation pass, not after it.
    _, _, refresh = sampling_switches(model.head, cfg=config.sample_cfg,
                                      cfg_interval=cfg_interval, head_steps=head_steps,
                                      cfg_refresh=cfg_refresh, backbone=model.backbone)
    categories = _categories(data)
    per_category = max(1, math.ceil(samples / len(categories)))
    _check_frechet_count(per_category * len(categories), data.image_size, min_count)

    t0 = time.perf_counter()
    batches = validation_batches(
        data, text_tokenizer, text_len=config.model.text_len, count=validation_examples
    )
    totals, targets = validation_loss_terms(model, batches, seed=seed, noise_draws=noise_draws)
    validation = validation_summary(model, totals, targets, examples=validation_examples,
                                    noise_draws=noise_draws)
    t1 = time.perf_counter()

    judge = ShapesEval()
    prompts = judge.prompts(per_category, seed=seed, categories=categories)
    images = generate_images(
        model, text_tokenizer, prompts, text_len=config.model.text_len, seed=seed,
        steps=config.sample_steps, cfg=config.sample_cfg,
        temperature=config.sample_temperature, batch_size=batch_size, progress=progress,
        cfg_interval=cfg_interval, head_steps=head_steps, cfg_refresh=cfg_refresh,
    )
    t2 = time.perf_counter()

    scores = judge.score(images, prompts)
    generated = feature_stats(ShapesFeatures(), images, min_count=min_count)
    reference = shapes_reference_stats(data.image_size, **shapes_options(data))
    t3 = time.perf_counter()

    result = {
        "model": model_summary(model, config),
        "validation": validation,
        "shapes_eval": {k: scores[k] for k in ("overall", "categories", "intervals", "counts")},
        "frechet": {
            "distance": generated.distance(reference),
            "samples": len(images),
            "reference_count": REFERENCE_COUNT,
            "extractor": ShapesFeatures.name,
            "rough": len(images) <= generated.mean.shape[0],
        },
        "sampling": {
            "steps": config.sample_steps,
            "cfg": config.sample_cfg,
            "cfg_schedule": model.default_cfg_schedule,
            "temperature": config.sample_temperature,
            "seed": seed,
            "cfg_interval": None if cfg_interval is None else list(cfg_interval),
            "head_steps": head_steps if head_steps is None or isinstance(head_steps, int)
            else list(head_steps),
            "cfg_refresh": refresh,  # None: plain guidance (or none: cfg 1)
        },
        "seconds": {
            "validation": t1 - t0, "generation": t2 - t1, "scoring": t3 - t2,
        },
    }
    return result, images, prompts


def model_summary(model: Any, config: Any) -> dict[str, Any]:
    """The `model` entry of an evaluation result: its parts and parameter counts."""
    from ..build import count_params, non_embedding_params

    return {
        "tokenizer": config.model.tokenizer.name,
        "head": config.model.head.name,
        "order": config.model.order.name,
        "backbone": config.model.backbone.name,
        "width": config.model.width,
        "depth": config.model.backbone.kwargs.get("depth"),
        "parameters": count_params(model),
        "non_embedding_parameters": non_embedding_params(model),
    }


def _grid_indices(prompts: Sequence[str], per_category: int) -> list[int]:
    from ..data.shapes import parse_caption

    seen: dict[str, int] = {}
    picked = []
    for i, prompt in enumerate(prompts):
        category = parse_caption(prompt)["category"]
        if seen.get(category, 0) < per_category:
            seen[category] = seen.get(category, 0) + 1
            picked.append(i)
    return picked


def write_report(
    result: dict[str, Any], images: np.ndarray, prompts: Sequence[str], out: str | Path
) -> Path:
    """Write `eval.json`, a sample grid `samples.png` and a short `eval.md` into the
    directory `out` (`fluid.run.EvalReport`); returns the path of `eval.json`.

    A result of `evaluate` (on `shapes`) gets one grid row per category; one of
    `evaluate_data` the first `GRID_PER_CATEGORY` rows of its images, and the measures it
    has (validation loss, CLIPScore, Frechet distance) with their sample counts."""
    from ..viz import save_grid
    from ._user_data import data_markdown

    report = EvalReport(out)
    report.root.mkdir(parents=True, exist_ok=True)
    shapes = "shapes_eval" in result
    picked = (_grid_indices(prompts, GRID_PER_CATEGORY) if shapes
              else list(range(min(len(prompts), GRID_PER_CATEGORY**2))))
    save_grid(images[picked], report.samples, captions=[prompts[i] for i in picked],
              cols=GRID_PER_CATEGORY)
    report.result.write_text(json.dumps(result, indent=1))
    markdown = _markdown if shapes else data_markdown
    report.markdown.write_text(markdown(result, samples=report.samples.name))
    return report.result


def _markdown(result: dict[str, Any], *, samples: str) -> str:
    model, val, shapes, fd = (result[k] for k in ("model", "validation", "shapes_eval", "frechet"))
    title = result.get("checkpoint", "a model")
    lines = [
        f"# Evaluation of {title}",
        "",
        (
            f"{model['tokenizer']} tokens, {model['order']} order, {model['backbone']} "
            f"backbone, {model['head']} head; {model['non_embedding_parameters']:,} "
            f"non-embedding parameters ({model['parameters']:,} in all)."
        ),
        "",
        "| measure | value |",
        "|---|---|",
        f"| validation loss ({val['units']}) | {val['loss']:.4f} |",
    ]
    for ratio, loss in (val["by_mask_ratio"] or {}).items():
        lines.append(f"| validation loss at mask ratio {ratio} | {loss:.4f} |")
    lines.append(f"| ShapesEval overall | {shapes['overall']:.3f} |")
    for category, accuracy in shapes["categories"].items():
        # Results saved before intervals were reported have none.
        interval = shapes.get("intervals", {}).get(category)
        shown = "" if interval is None else f" (95% CI {interval[0]:.3f}-{interval[1]:.3f})"
        lines.append(f"| ShapesEval {category} ({shapes['counts'][category]} images) | "
                     f"{accuracy:.3f}{shown} |")
    rough = " (rough: fewer samples than features)" if fd["rough"] else ""
    lines += [
        (
            f"| Frechet distance ({fd['extractor']}, {fd['samples']} samples vs "
            f"{fd['reference_count']} reference images){rough} | {fd['distance']:.3f} |"
        ),
        "",
        f"Sampling: {result['sampling']['steps']} steps, guidance {result['sampling']['cfg']}"
        # Reports written before the schedule was recorded sampled with "linear".
        f" ({result['sampling'].get('cfg_schedule', 'linear')}), "
        f"temperature {result['sampling']['temperature']}. Validation: "
        f"{val['examples']} held-out examples, {val['noise_draws']} noise draws each"
        + ("" if val["by_mask_ratio"] is None
           else ", at each mask ratio (quantiles of the order's training draw)") + ". "
        "Continuous and discrete losses are in different units and do not compare.",
        "",
        f"![samples]({samples})",
        "",
    ]
    return "\n".join(lines)


def default_out_dir(path: str | Path) -> Path:
    """Where `fluid eval <path>` writes by default: `<run>/eval` for a run, a saved model's
    directory, or `<run>/eval/step_<n>` for a checkpoint `<run>/checkpoints/<n>`."""
    checkpoint = RunFolder.of_checkpoint(path)
    if checkpoint is not None:
        run, step = checkpoint
        return run.eval_of(step)
    return RunFolder(path).eval


def evaluate_checkpoint(
    path: str | Path, *, out: str | Path | None = None, raw: bool = False,
    verbose: bool = False, data: str | Path | None = None, prompts: str | Path | None = None,
    **options: Any
) -> dict[str, Any]:
    """`fluid eval`: load a run, one of its checkpoints or a saved model, evaluate it and
    write the report.

    **Arguments:**

    - `path`: as for `fluid.run.load_model`.
    - `out`: the report's directory (`default_out_dir(path)` when `None`).
    - `raw`: evaluate the raw weights instead of the EMA ones.
    - `verbose`: print which weights (step, file) are evaluated.
    - `data`, `prompts`: evaluate on your image-caption pairs or prompts (`evaluate_data`)
      instead of the built-in `shapes` data (`evaluate`).
    - `options`: keyword arguments of `evaluate`, or of `evaluate_data` with `data` or
      `prompts`.

    **Returns:**

    The result dict, as written to `eval.json` (with `checkpoint` and `out` added).
    """
    from ._user_data import evaluate_data

    weights = find_weights(path, ema=not raw)
    if verbose:
        print(f"evaluating {weights.describe()}")
    model, text_tokenizer, config = load_model(weights, ema=not raw)
    if data is not None or prompts is not None:
        result, images, prompts = evaluate_data(model, text_tokenizer, config, data=data,
                                                prompts=prompts, **options)
    else:
        result, images, prompts = evaluate(model, text_tokenizer, config, **options)
    out = Path(out) if out is not None else default_out_dir(path)
    result = {"checkpoint": str(path), "step": weights.step, "out": str(out),
              "weights": "raw" if raw else "ema", **result}
    write_report(result, images, prompts, out)
    return result
