"""`fluid eval --data` / `--prompts` (`fluid.eval.evaluate_data`): every number equals the
function it stands for, computed here directly on the same items; reference statistics are
cached and reused; bad inputs are refused before anything is generated.

A tiny `tiny-fluid` model (random weights, saved as `Recipe.save` saves a run), ten image-caption
pairs written here and a tiny random CLIP folder (`test_clip`'s): seconds, not minutes.
"""

import json

import numpy as np
import pytest
from helpers import tiny_config, untrained_pipeline, user_error, write_tiny_clip_folder
from PIL import Image

import fluid.eval._evaluate
from fluid._errors import ConfigError, MissingInputError
from fluid._weights import WeightError
from fluid.cli import main
from fluid.data import load_image
from fluid.eval import (
    CLIPEncoder,
    CLIPFeatures,
    FeatureStats,
    InceptionFeatures,
    clip_score,
    data_reference_stats,
    evaluate_data,
    feature_stats,
    validation_loss,
)
from fluid.run import RunFolder, save_model_file

CAPTIONS = ["a red circle", "a blue square", "two green triangles",
            "a red square left of a blue circle", "three yellow circles", "a purple triangle",
            "a green circle", "two red squares", "a blue triangle above a red circle",
            "an orange square"]
SAMPLES, HELD_OUT, SEED = 8, 4, 3
# The tiny CLIP's 24 features need 25 samples for a full-rank covariance: tests take fewer.
FEW = {"samples": SAMPLES, "min_count": 2, "validation_examples": HELD_OUT, "seed": SEED,
       "progress": False}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("user-data")
    rng = np.random.default_rng(0)
    pairs = root / "pairs"
    pairs.mkdir()
    for i, caption in enumerate(CAPTIONS):
        # Not square, not the model's size: read centre-cropped, as training reads them.
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
            pairs / f"{i:02d}.png")
        (pairs / f"{i:02d}.txt").write_text(caption)
    # A blank line and padded prompts: skipped and stripped.
    (root / "prompts.txt").write_text("a red circle\n\n  a blue square  \ntwo green triangles\n")
    pipeline = untrained_pipeline(tiny_config())
    # What Recipe.save writes (config, caption tokenizer, model file): what fluid eval reads.
    run = RunFolder(root / "run")
    run.root.mkdir()
    run.write_config(pipeline.config)
    pipeline.text_tokenizer.save(run.text_tokenizer)
    save_model_file(run.model, pipeline.model, step=0)
    return {"root": root, "pairs": pairs, "prompts": root / "prompts.txt", "run": run.root,
            "clip": write_tiny_clip_folder(root / "clip"), "pipeline": pipeline}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUID_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _model(world):
    p = world["pipeline"]
    return p.model, p.text_tokenizer, p.config


def test_every_number_equals_its_direct_computation(world, cache):
    model, text_tokenizer, config = _model(world)
    clip = CLIPEncoder.from_pretrained(world["clip"])
    result, images, captions = evaluate_data(model, text_tokenizer, config,
                                             data=world["pairs"], clip=clip, **FEW)
    size = config.data.image_size
    names = sorted(f"{i:02d}.png" for i in range(len(CAPTIONS)))
    order = np.random.default_rng(SEED).permutation(len(CAPTIONS))

    # Validation: the first HELD_OUT pairs of the seeded order, through validation_loss.
    held = order[:HELD_OUT]
    assert result["validation"]["pairs"] == [names[i] for i in held]
    assert result["validation"]["examples"] == HELD_OUT
    ids, mask = text_tokenizer.encode([CAPTIONS[i] for i in held], config.model.text_len)
    batch = {"image": np.stack([load_image(world["pairs"] / names[i], size) for i in held]),
             "text_ids": np.asarray(ids), "text_mask": np.asarray(mask)}
    assert result["validation"]["loss"] == validation_loss(model, [batch], seed=SEED)

    # One image per caption of the first SAMPLES pairs, scored by clip_score.
    assert captions == [CAPTIONS[i] for i in order[:SAMPLES]]
    assert images.shape == (SAMPLES, size, size, 3)
    assert result["clip_score"] == {"score": clip_score(clip, images, captions),
                                    "samples": SAMPLES, "clip": clip.fingerprint}

    # FD: CLIP features of the generated images against all ten real images'.
    features = CLIPFeatures(clip)
    real = np.stack([load_image(world["pairs"] / names[i], size) for i in order])
    expected = feature_stats(features, images, min_count=2).distance(
        FeatureStats.from_features(features(real), features.name, min_count=2))
    fd = result["frechet"]
    np.testing.assert_allclose(fd["distance"], expected, rtol=1e-12)
    assert (fd["samples"], fd["reference_count"], fd["reference_seed"]) == (SAMPLES, 10, SEED)
    assert fd["extractor"] == f"clip-{clip.fingerprint}" and fd["rough"]
    # Cached with its count and seed, keyed by the data, size, count, seed and CLIP weights.
    (cached,) = cache.glob("*.npz")
    assert f"-{size}px-n10-seed{SEED}-clip-{clip.fingerprint}" in cached.name
    stats = FeatureStats.load(cached)
    assert (stats.count, stats.seed, stats.extractor) == (10, SEED, features.name)

    # The same pairs listed in a JSONL file (in the folder's order): the same numbers, the
    # pairs named by line, the same real images' statistics read from the cache.
    jsonl = world["root"] / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"image": f"pairs/{name}", "caption": CAPTIONS[i]})
                             + "\n" for i, name in enumerate(names)))
    again, _, _ = evaluate_data(model, text_tokenizer, config, data=jsonl, clip=clip, **FEW)
    assert again["validation"]["pairs"] == [f"line {i + 1}" for i in held]
    for measure in ("validation", "clip_score", "frechet"):
        assert {**again[measure], "pairs": 0, "reference": 0} == {
            **result[measure], "pairs": 0, "reference": 0}
    assert list(cache.glob("*.npz")) == [cached]


def test_the_cli_writes_the_report_and_reuses_the_cached_reference(world, cache, capsys):
    out = world["root"] / "report"
    argv = ["eval", world["run"], "--data", world["pairs"], "--clip", world["clip"],
            "--samples", SAMPLES, "--min-count", 2, "--validation-examples", HELD_OUT,
            "--seed", SEED, "--out", out]
    assert main([str(a) for a in argv]) == 0
    first = json.loads((out / "eval.json").read_text())
    printed = capsys.readouterr().out
    assert "CLIPScore" in printed and "Frechet distance" in printed
    assert first["validation"]["examples"] == HELD_OUT
    assert first["clip_score"]["samples"] == first["frechet"]["samples"] == SAMPLES
    markdown = (out / "eval.md").read_text()
    assert f"CLIPScore ({SAMPLES} images" in markdown
    assert f"{SAMPLES} samples vs 10 real images, seed {SEED}" in markdown
    assert (out / "samples.png").stat().st_size > 0

    # The second run reads the cached statistics: doctored ones change the distance, and
    # the file is not rewritten.
    (cached,) = cache.glob("*.npz")
    stats = FeatureStats.load(cached)
    doctored = FeatureStats(stats.mean + 1.0, stats.cov, stats.count, stats.extractor,
                            seed=stats.seed)
    doctored.save(cached)
    written = cached.stat().st_mtime_ns
    assert main([str(a) for a in argv]) == 0
    second = json.loads((out / "eval.json").read_text())
    assert cached.stat().st_mtime_ns == written
    assert second["clip_score"] == first["clip_score"]
    assert second["validation"]["loss"] == first["validation"]["loss"]
    assert second["frechet"]["distance"] != first["frechet"]["distance"]
    # Its generated statistics against the doctored reference give its distance exactly.
    features = CLIPFeatures(world["clip"])
    model, text_tokenizer, config = _model(world)
    _, images, _ = evaluate_data(model, text_tokenizer, config, data=world["pairs"], **FEW)
    generated = feature_stats(features, images, min_count=2)
    np.testing.assert_allclose(second["frechet"]["distance"], generated.distance(doctored),
                               rtol=1e-12)

    # Another seed is another subset: its own cache file.
    data_reference_stats(sorted(str(p) for p in world["pairs"].glob("*.png")),
                         config.data.image_size, features, seed=SEED + 1, min_count=2)
    assert len(list(cache.glob("*.npz"))) == 2


def test_prompts_give_clip_score_and_fd_only_against_reference_images(world, cache):
    model, text_tokenizer, config = _model(world)
    clip = CLIPEncoder.from_pretrained(world["clip"])
    result, images, captions = evaluate_data(model, text_tokenizer, config,
                                             prompts=world["prompts"], clip=clip, **FEW)
    assert result["validation"] is None and result["frechet"] is None
    prompts = ["a red circle", "a blue square", "two green triangles"]
    order = np.random.default_rng(SEED).permutation(3)
    # Three prompts for eight images: the seeded order, repeated.
    assert captions == [prompts[order[i % 3]] for i in range(SAMPLES)]
    assert result["clip_score"]["score"] == clip_score(clip, images, captions)

    result, images, _ = evaluate_data(model, text_tokenizer, config, prompts=world["prompts"],
                                      clip=clip, reference=world["pairs"], **FEW)
    assert result["frechet"]["reference_count"] == len(CAPTIONS)
    features = CLIPFeatures(clip)
    paths = sorted(world["pairs"].glob("*.png"))
    real = np.stack([load_image(paths[i], config.data.image_size)
                     for i in np.random.default_rng(SEED).permutation(len(paths))])
    expected = feature_stats(features, images, min_count=2).distance(
        FeatureStats.from_features(features(real), min_count=2))
    np.testing.assert_allclose(result["frechet"]["distance"], expected, rtol=1e-12)


def _mean_colour(images):
    return images.mean((1, 2))


def test_any_feature_extractor_serves_the_frechet_distance(world, cache):
    # The Inception adapter with a network of the user's (here: mean colour, 3 features),
    # no CLIP: prompts and reference images give the distance alone.
    model, text_tokenizer, config = _model(world)
    features = InceptionFeatures(_mean_colour, name="mean-colour", input_size=8)
    result, images, _ = evaluate_data(model, text_tokenizer, config, prompts=world["prompts"],
                                      features=features, reference=world["pairs"], **FEW)
    assert result["clip_score"] is None and result["validation"] is None
    paths = sorted(world["pairs"].glob("*.png"))
    real = np.stack([load_image(paths[i], config.data.image_size)
                     for i in np.random.default_rng(SEED).permutation(len(paths))])
    expected = feature_stats(features, images).distance(feature_stats(features, real))
    np.testing.assert_allclose(result["frechet"]["distance"], expected, rtol=1e-12)
    assert result["frechet"]["extractor"] == "mean-colour" and not result["frechet"]["rough"]
    (cached,) = cache.glob("*.npz")
    assert cached.name.endswith(f"-n10-seed{SEED}-mean-colour.npz")


def test_bad_inputs_are_refused_before_generating(world, cache, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("images were generated before the inputs were checked")

    monkeypatch.setattr(fluid.eval._evaluate, "generate_images", refuse)
    model, text_tokenizer, config = _model(world)
    args = (model, text_tokenizer, config)
    # Too few samples for the Frechet distance of 24 CLIP features: how many, which flag.
    with pytest.raises(ConfigError, match=r"8 generated samples .* at least 25 .*--samples"
                                          r".*--min-count"):
        evaluate_data(*args, data=world["pairs"], clip=world["clip"], samples=8)
    with pytest.raises(ConfigError, match=r"10 reference images .* at least 25 .*--min-count"):
        evaluate_data(*args, data=world["pairs"], clip=world["clip"], samples=30)
    with pytest.raises(MissingInputError, match="UTF-8|no usable records"):
        evaluate_data(*args, data=world["pairs"] / "00.png", **FEW)  # an image, not JSONL
    with pytest.raises(MissingInputError, match="no data at"):
        evaluate_data(*args, data=tmp_path / "nowhere", clip=world["clip"], **FEW)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingInputError, match="no images with .txt captions"):
        evaluate_data(*args, data=tmp_path / "empty", **FEW)
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ConfigError, match="has no prompt"):
        evaluate_data(*args, prompts=tmp_path / "blank.txt", clip=world["clip"], **FEW)
    with pytest.raises(ConfigError, match="nothing to measure"):
        evaluate_data(*args, prompts=world["prompts"], **FEW)
    with pytest.raises(MissingInputError, match="no CLIP folder"):
        evaluate_data(*args, data=world["pairs"], clip=tmp_path / "no-clip", **FEW)
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(WeightError, match="model_type 't5'"):
        evaluate_data(*args, data=world["pairs"], clip=tmp_path / "t5", **FEW)


def test_cli_errors_are_one_line(world, cache, tmp_path, capsys):
    run = world["run"]
    line = user_error(capsys, ["eval", run, "--data", world["pairs"], "--clip", world["clip"],
                               "--samples", 8])
    assert "at least 25 are needed" in line and "--min-count" in line
    assert "no data at" in user_error(capsys, ["eval", run, "--data", tmp_path / "x"])
    assert "--data PATH or --prompts FILE" in user_error(capsys, ["eval", run, "--clip",
                                                                  world["clip"]])
