"""`fluid eval --data` / `--prompts`: a model scored on a user's own image-caption pairs or
prompts: the validation loss on held-out pairs, CLIPScore of generated images against their
captions, and the Frechet distance between features (CLIP's, or any extractor's) of the
generated images and of real ones, whose statistics are cached."""

import hashlib
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import ConfigError, MissingInputError
from ..data import (
    IMAGE_EXTENSIONS,
    BadRecord,
    FolderSource,
    JsonlSource,
    SkippedRecordWarning,
    load_image,
)
from ..model import sampling_switches
from ..sample import read_prompts
from ._abstract import AbstractFeatureExtractor
from ._clip import CLIPEncoder
from ._clip_score import CLIPFeatures, clip_scores
from ._frechet import FeatureStats, cache_dir, check_frechet_count, feature_stats
from ._validation import (
    NOISE_DRAWS,
    VALIDATION_EXAMPLES,
    validation_loss_terms,
    validation_summary,
)

# Captions generated for by default: the data's pairs, at most this many (a seeded subset),
# enough for the Frechet distance of ViT-B/32's (512) and ViT-L/14's (768) CLIP features.
DATA_SAMPLES = 1024
# Real images summarised by default for the Frechet distance (a seeded subset of larger
# data), the size of FID's usual reference sets.
DATA_REFERENCE_COUNT = 10_000
# Images generated when nothing scores them: only the report's sample grid needs them.
GRID_IMAGES = 16
_BATCH = 64
_PAIRS = ('a folder of images with same-named .txt captions (cat.png + cat.txt) or a JSONL '
          'file with one {"image": "cat.png", "caption": "a cat"} per line, as fluid train '
          "reads them (data.dataset=folder or jsonl)")


def open_pairs(path: str | os.PathLike, image_size: int) -> FolderSource | JsonlSource:
    """The image-caption pairs at `path`: a folder (`FolderSource`) or a JSONL file
    (`JsonlSource`), read at `image_size`. Raises `MissingInputError` for a path that does
    not exist or holds no usable pair."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"no data at {path}: expected {_PAIRS}.")
    try:
        return FolderSource(path, image_size) if path.is_dir() else JsonlSource(path, image_size)
    except UnicodeDecodeError as error:
        raise MissingInputError(f"{path} is not a UTF-8 JSONL file ({error.reason}); "
                                f"expected {_PAIRS}.") from error
    except ValueError as error:
        raise MissingInputError(str(error)) from error


def image_paths(path: str | os.PathLike) -> list[str]:
    """The image files of real images for the Frechet distance: a folder's images (searched
    recursively, sorted, captions not needed; names starting with `.` ignored) or the
    images a JSONL file of pairs lists. Raises `MissingInputError` when there are none."""
    path = Path(path).absolute()
    if path.is_file():
        return list(open_pairs(path, 1).images)
    if not path.is_dir():
        raise MissingInputError(f"no reference images at {path}: expected a folder of images "
                                f"({', '.join(IMAGE_EXTENSIONS)}) or a JSONL file of pairs.")
    found = []
    for folder, dirs, files in os.walk(path, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(folder, f) for f in files
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    if not found:
        raise MissingInputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {path}.")
    return sorted(found)


def _source_paths(source: FolderSource | JsonlSource) -> list[str]:
    if isinstance(source, FolderSource):
        return [str(source.root / p) for p in source.paths]
    return list(source.images)


def _pair_names(source: FolderSource | JsonlSource, indices: list[int]) -> list[str]:
    if isinstance(source, FolderSource):
        return [source.paths[i] for i in indices]
    return [f"line {source.lines[i]}" for i in indices]


def seeded_order(count: int, seed: int) -> np.ndarray:
    """The order in which evaluation reads `count` items (pairs, prompts, images): the
    permutation `np.random.default_rng(seed).permutation(count)`. Held-out pairs, captions
    to generate for and reference images are its first items."""
    return np.random.default_rng(seed).permutation(count)


def _skip(error: BadRecord) -> None:
    warnings.warn(f"skipped: {error}", SkippedRecordWarning, stacklevel=3)


def _first_usable(read: Any, order: np.ndarray, count: int) -> tuple[list[int], list[Any]]:
    """The first `count` items of `order` that `read` reads without `BadRecord` (each bad
    one warned about and skipped)."""
    indices, items = [], []
    for i in order:
        if len(items) == count:
            break
        try:
            items.append(read(int(i)))
        except BadRecord as error:
            _skip(error)
            continue
        indices.append(int(i))
    return indices, items


def _images_digest(paths: Sequence[str]) -> str:
    """A digest of which files a set of real images is, and of their sizes and modification
    times: statistics cached for them are not reused once a file is added, removed or
    rewritten."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            info = os.stat(path)
            stamp = f"{info.st_size}:{info.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{os.path.abspath(path)}\0{stamp}\n".encode())
    return digest.hexdigest()[:16]


def _feature_dims(extractor: AbstractFeatureExtractor, image_size: int) -> int:
    if isinstance(extractor, CLIPFeatures):
        return extractor.clip.projection_dim
    return extractor(np.zeros((1, image_size, image_size, 3), np.float32)).shape[1]


def data_reference_stats(
    paths: Sequence[str | os.PathLike],
    image_size: int,
    extractor: AbstractFeatureExtractor,
    *,
    count: int | None = None,
    seed: int = 0,
    min_count: int | None = None,
    path: str | os.PathLike | None = None,
) -> FeatureStats:
    """Statistics of real images' features, computed once and cached.

    The images are the first `count` readable files of `paths` in `seeded_order(len(paths),
    seed)` (an unreadable one is skipped with a warning), each decoded by `load_image` at
    `image_size` (centre-cropped, as training reads them).

    **Arguments:**

    - `paths`: the image files (`image_paths` of a folder or JSONL file).
    - `image_size`: side the images are read at (the model's).
    - `extractor`: the feature extractor (`CLIPFeatures`, `InceptionFeatures`, ...).
    - `count`: how many images; by default all of them, at most `DATA_REFERENCE_COUNT`.
    - `seed`: picks which images when `count` is fewer than there are.
    - `min_count`: as for `FeatureStats.from_features`.
    - `path`: the cache file; by default a file in `cache_dir()` named after a digest of the
      files (names, sizes, modification times), the image size, the count, the seed and
      the extractor's name (for CLIP a digest of its weights). Read when it exists and
      matches the extractor and seed; else computed and written.

    **Returns:**

    The statistics, with their `count` (images actually read) and `seed`. Raises
    `ConfigError` for fewer images than the Frechet distance needs.
    """
    if count is not None and count < 1:
        raise ConfigError(f"count must be positive, got {count}.")
    paths = [os.fspath(p) for p in paths]
    wanted = min(len(paths), DATA_REFERENCE_COUNT if count is None else count)
    dims = _feature_dims(extractor, image_size)
    check_frechet_count(wanted, dims, extractor.name, min_count, "reference images",
                 "give more real images")
    if path is None:
        path = cache_dir() / (f"images-{_images_digest(paths)}-{image_size}px-n{wanted}-"
                              f"seed{seed}-{extractor.name}.npz")
    path = Path(path)
    if path.exists():
        stats = FeatureStats.load(path)
        if stats.extractor == extractor.name and stats.seed == seed:
            return stats
    _, images = _first_usable(lambda i: load_image(paths[i], image_size),
                              seeded_order(len(paths), seed), wanted)
    check_frechet_count(len(images), dims, extractor.name, min_count, "readable reference images",
                 "give more real images")
    features = np.concatenate([extractor(np.stack(images[i : i + _BATCH]))
                               for i in range(0, len(images), _BATCH)])
    stats = FeatureStats.from_features(features, extractor.name, min_count)
    stats = FeatureStats(stats.mean, stats.cov, stats.count, stats.extractor, seed=seed)
    stats.save(path)
    return stats


def _cycled(items: Sequence[str], count: int) -> list[str]:
    return [items[i % len(items)] for i in range(count)]


def evaluate_data(
    model: Any,
    text_tokenizer: Any,
    config: Any,
    *,
    data: str | os.PathLike | None = None,
    prompts: str | os.PathLike | Sequence[str] | None = None,
    clip: CLIPEncoder | str | os.PathLike | None = None,
    features: AbstractFeatureExtractor | None = None,
    reference: str | os.PathLike | None = None,
    samples: int | None = None,
    reference_count: int | None = None,
    seed: int = 0,
    validation_examples: int = VALIDATION_EXAMPLES,
    noise_draws: int = NOISE_DRAWS,
    min_count: int | None = None,
    batch_size: int = 64,
    progress: bool = True,
    cfg_interval: tuple[float, float] | None = None,
    head_steps: int | Sequence[int] | None = None,
    cfg_refresh: int | None = None,
) -> tuple[dict[str, Any], np.ndarray, list[str]]:
    """Evaluate a model on a user's own image-caption pairs (`data`) or prompts (`prompts`).

    Which items: every choice is a prefix of `seeded_order(n, seed)` over the `n` pairs
    (skipping unreadable ones, with a warning), so the same `seed` picks the same items.

    - Validation loss (`data` only): `validation_loss` on the first `validation_examples`
      pairs (all of them if fewer), with keys from `seed`; their names are in the result.
    - Generated images: one per caption of the first `samples` pairs (or prompts), with the
      run's sampling settings; when `samples` exceeds the captions, they repeat in order.
    - CLIPScore (with `clip`): `clip_score` of the generated images against their captions.
    - Frechet distance (with `clip` or `features`, and real images: the data's, or
      `reference`'s): between `features` of the generated images (`CLIPFeatures(clip)` by
      default) and `data_reference_stats` of the real images, cached.

    **Arguments:**

    - `model`, `text_tokenizer`, `config`: as `fluid.run.load_model` returns them.
    - `data`: a folder or JSONL file of pairs (`open_pairs`).
    - `prompts`: instead of `data`, a text file of prompts (`read_prompts`) or the prompts.
    - `clip`: a `CLIPEncoder` or a Hugging Face CLIP folder.
    - `features`: the Frechet distance's extractor (`InceptionFeatures` with your network,
      say); `CLIPFeatures(clip)` when `None` and `clip` is given.
    - `reference`: real images for the Frechet distance (`image_paths`: a folder of images
      or a JSONL file); by default `data`'s.
    - `samples`: images to generate; by default one per pair (at most `DATA_SAMPLES`) or per
      prompt, or `GRID_IMAGES` when nothing scores them.
    - `reference_count`: real images summarised (`data_reference_stats`' `count`).
    - `seed`: the order of the items, the generation and the validation keys.
    - `validation_examples`, `noise_draws`: as for `validation_loss`.
    - `min_count`: fewest samples the Frechet distance accepts (`FeatureStats`).
    - `batch_size`, `progress`, `cfg_interval`, `head_steps`, `cfg_refresh`: as for
      `evaluate`.

    **Returns:**

    `(result, images, captions)`: a JSON-ready dict (`validation`, `clip_score` and
    `frechet` are `None` when not measured; each measure carries its sample count), the
    generated images and their captions. Raises `MissingInputError` for an empty or missing
    data path, prompts file or CLIP folder, and `ConfigError` for too few samples for the
    Frechet distance, before anything is generated.
    """
    from ._evaluate import generate_images, model_summary

    if (data is None) == (prompts is None):
        raise ConfigError("evaluate on one of data (--data: image-caption pairs) or prompts "
                          "(--prompts: a text file, one prompt per line).")
    if samples is not None and samples < 1:
        raise ConfigError(f"samples must be positive, got {samples}.")
    image_size = config.data.image_size
    _, _, refresh = sampling_switches(model.head, cfg=config.sample_cfg,
                                      cfg_interval=cfg_interval, head_steps=head_steps,
                                      cfg_refresh=cfg_refresh, backbone=model.backbone)
    if clip is not None and not isinstance(clip, CLIPEncoder):
        clip = CLIPEncoder.from_pretrained(clip)
    if clip is not None and clip.tokenizer is None:
        raise MissingInputError("the CLIP folder has no tokenizer (vocab.json and merges.txt), "
                                "which CLIPScore needs to read the captions.")
    if features is None and clip is not None:
        features = CLIPFeatures(clip)

    source = None
    if data is not None:
        source = open_pairs(data, image_size)
        order = seeded_order(len(source), seed)
        available = len(source)
    else:
        texts = read_prompts(prompts) if isinstance(prompts, (str, os.PathLike)) else [
            p.strip() for p in prompts if p.strip()]
        if not texts:
            raise MissingInputError("no prompts were given.")
        order = seeded_order(len(texts), seed)
        available = len(texts)
    real = (image_paths(reference) if reference is not None
            else _source_paths(source) if source is not None else None)
    frechet = features is not None and real is not None
    if source is None and clip is None and not frechet:
        raise ConfigError("prompts alone give nothing to measure: pass a CLIP folder (clip, "
                          "--clip) for CLIPScore, and real images (reference, --reference) "
                          "with it for the Frechet distance.")
    scoring = clip is not None or frechet
    if samples is None:
        samples = min(available, DATA_SAMPLES) if scoring else min(available, GRID_IMAGES)
    if frechet:
        dims = _feature_dims(features, image_size)
        check_frechet_count(samples, dims, features.name, min_count, "generated samples",
                     "pass more samples (--samples; captions repeat when there are fewer)")
        reference_wanted = min(len(real), DATA_REFERENCE_COUNT if reference_count is None
                               else reference_count)
        check_frechet_count(reference_wanted, dims, features.name, min_count, "reference images",
                     "give more real images (or a larger reference_count, --reference-count)")

    t0 = time.perf_counter()
    validation = None
    if source is not None:
        indices, items = _first_usable(source.__getitem__, order, validation_examples)
        if not items:
            raise MissingInputError(f"no pair of {data} is readable; expected {_PAIRS}.")
        ids, mask = text_tokenizer.encode([item["caption"] for item in items],
                                          config.model.text_len)
        batch = {"image": np.stack([item["image"] for item in items]),
                 "text_ids": np.asarray(ids), "text_mask": np.asarray(mask)}
        totals, targets = validation_loss_terms(model, [batch], seed=seed,
                                                noise_draws=noise_draws)
        validation = {
            **validation_summary(model, totals, targets, examples=len(items),
                                 noise_draws=noise_draws),
            "pairs": _pair_names(source, indices),
        }
    t1 = time.perf_counter()

    if source is not None:
        _, captions = _first_usable(source.caption, order, min(samples, available))
        if not captions:
            raise MissingInputError(f"no pair of {data} has a usable caption.")
    else:
        captions = [texts[i] for i in order[: min(samples, available)]]
    captions = _cycled(captions, samples)
    images = generate_images(
        model, text_tokenizer, captions, text_len=config.model.text_len, seed=seed,
        steps=config.sample_steps, cfg=config.sample_cfg,
        temperature=config.sample_temperature, batch_size=batch_size, progress=progress,
        cfg_interval=cfg_interval, head_steps=head_steps, cfg_refresh=cfg_refresh,
    )
    t2 = time.perf_counter()

    clip_result = None
    if clip is not None:
        scores = clip_scores(clip, images, captions)
        clip_result = {"score": max(float(scores.mean()), 0.0), "samples": len(images),
                       "clip": clip.fingerprint}
    frechet_result = None
    if frechet:
        generated = feature_stats(features, images, min_count=min_count)
        real_stats = data_reference_stats(real, image_size, features, count=reference_count,
                                          seed=seed, min_count=min_count)
        frechet_result = {
            "distance": generated.distance(real_stats),
            "samples": len(images),
            "reference_count": real_stats.count,
            "reference_seed": real_stats.seed,
            "reference": os.fspath(reference if reference is not None else data),
            "extractor": features.name,
            "rough": min(len(images), real_stats.count) <= generated.mean.shape[0],
        }
    t3 = time.perf_counter()

    result = {
        "model": model_summary(model, config),
        "data": {
            "path": os.fspath(data if data is not None else prompts)
            if isinstance(data if data is not None else prompts, (str, os.PathLike)) else None,
            "kind": "prompts" if source is None else
            "folder" if isinstance(source, FolderSource) else "jsonl",
            "items": available, "image_size": image_size, "seed": seed,
        },
        "validation": validation,
        "clip_score": clip_result,
        "frechet": frechet_result,
        "sampling": {
            "steps": config.sample_steps, "cfg": config.sample_cfg,
            "temperature": config.sample_temperature, "seed": seed, "images": len(images),
            "cfg_interval": None if cfg_interval is None else list(cfg_interval),
            "head_steps": head_steps if head_steps is None or isinstance(head_steps, int)
            else list(head_steps),
            "cfg_refresh": refresh,
        },
        "seconds": {"validation": t1 - t0, "generation": t2 - t1, "scoring": t3 - t2},
    }
    return result, images, captions


def data_markdown(result: dict[str, Any], *, samples: str) -> str:
    """The `eval.md` of an `evaluate_data` result."""
    model, data = result["model"], result["data"]
    val, clip, fd = result["validation"], result["clip_score"], result["frechet"]
    what = f"{data['items']} prompts" if data["kind"] == "prompts" else (
        f"{data['items']} image-caption pairs ({data['kind']})")
    lines = [
        f"# Evaluation of {result.get('checkpoint', 'a model')} on {data['path'] or 'prompts'}",
        "",
        (
            f"{model['tokenizer']} tokens, {model['order']} order, {model['backbone']} "
            f"backbone, {model['head']} head; {model['non_embedding_parameters']:,} "
            f"non-embedding parameters ({model['parameters']:,} in all). Data: {what}, "
            f"read at {data['image_size']} px, items picked by seed {data['seed']}."
        ),
        "",
        "| measure | value |",
        "|---|---|",
    ]
    if val is not None:
        lines.append(f"| validation loss ({val['units']}, {val['examples']} held-out pairs) | "
                     f"{val['loss']:.4f} |")
        for ratio, loss in (val["by_mask_ratio"] or {}).items():
            lines.append(f"| validation loss at mask ratio {ratio} | {loss:.4f} |")
    if clip is not None:
        lines.append(f"| CLIPScore ({clip['samples']} images, CLIP {clip['clip']}) | "
                     f"{clip['score']:.3f} |")
    if fd is not None:
        rough = " (rough: fewer samples than features)" if fd["rough"] else ""
        lines.append(
            f"| Frechet distance ({fd['extractor']}, {fd['samples']} samples vs "
            f"{fd['reference_count']} real images, seed {fd['reference_seed']}){rough} | "
            f"{fd['distance']:.3f} |"
        )
    sampling = result["sampling"]
    lines += [
        "",
        f"Sampling: {sampling['images']} images, {sampling['steps']} steps, guidance "
        f"{sampling['cfg']}, temperature {sampling['temperature']}."
        + ("" if val is None else f" Validation: {val['noise_draws']} noise draws per pair"
           + ("" if val["by_mask_ratio"] is None else ", at each mask ratio") + "."),
        "",
        f"![samples]({samples})",
        "",
    ]
    return "\n".join(lines)
