"""CLIP (`fluid.eval.CLIPEncoder`), CLIPScore and CLIP features, against `transformers` on
tiny random models.

Folders are built here (no download): with torch, a `transformers.CLIPModel` saved with
`save_pretrained`; without it, random NumPy tensors written under the same key names (the
reference tests check that the two layouts agree). A tiny byte-level BPE vocabulary stands in
for CLIP's 49,408 tokens, with the same special tokens, last as in CLIP's.
"""

import json

import chex
import jax
import numpy as np
import pytest

from fluid._errors import MissingInputError
from fluid._weights import WeightError, read_safetensors, write_safetensors
from fluid.eval import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CLIPEncoder,
    CLIPFeatures,
    FeatureStats,
    clip_score,
    clip_scores,
    feature_stats,
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's (and CLIP's) printable stand-in for every byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


MERGES = ["r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>", "o f</w>",
          "t h", "th e</w>", "l e", "le f", "lef t</w>"]


def tiny_vocab() -> dict[str, int]:
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += [a + b for a, b in (m.split() for m in MERGES)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]  # CLIP's special tokens come last
    return {t: i for i, t in enumerate(tokens)}


VOCAB = tiny_vocab()
VOCAB_SIZE, BOS, EOS = len(VOCAB), VOCAB["<|startoftext|>"], VOCAB["<|endoftext|>"]
LEGACY_EOS = 2  # what older CLIP configs say: transformers then pools at the largest id
CTX, SIZE, PATCH, PROJ = 16, 32, 8, 24
TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": CTX, "vocab_size": VOCAB_SIZE,
        "bos_token_id": BOS, "pad_token_id": EOS}
VISION = {"hidden_size": 48, "intermediate_size": 40, "num_hidden_layers": 2,
          "num_attention_heads": 4, "image_size": SIZE, "patch_size": PATCH}
CAPTIONS = ["a red circle", "the circle left of the red square", "", "RED, red; red!",
            "a circle " * 12]


def write_tokenizer(folder):
    (folder / "vocab.json").write_text(json.dumps(VOCAB))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")


def hf_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of a `CLIPModel` save of the tiny config, with its shape."""
    dt, dv = TEXT["hidden_size"], VISION["hidden_size"]
    shapes = {
        "logit_scale": (),
        "text_projection.weight": (PROJ, dt),
        "visual_projection.weight": (PROJ, dv),
        "text_model.embeddings.token_embedding.weight": (VOCAB_SIZE, dt),
        "text_model.embeddings.position_embedding.weight": (CTX, dt),
        "vision_model.embeddings.class_embedding": (dv,),
        "vision_model.embeddings.patch_embedding.weight": (dv, 3, PATCH, PATCH),
        "vision_model.embeddings.position_embedding.weight": ((SIZE // PATCH) ** 2 + 1, dv),
    }
    for name, d in [("text_model.final_layer_norm", dt), ("vision_model.pre_layrnorm", dv),
                    ("vision_model.post_layernorm", dv)]:
        shapes |= {f"{name}.weight": (d,), f"{name}.bias": (d,)}
    for tower, arch in [("text_model", TEXT), ("vision_model", VISION)]:
        d, ff = arch["hidden_size"], arch["intermediate_size"]
        for i in range(arch["num_hidden_layers"]):
            p = f"{tower}.encoder.layers.{i}."
            for norm in ("layer_norm1", "layer_norm2"):
                shapes |= {p + f"{norm}.weight": (d,), p + f"{norm}.bias": (d,)}
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes |= {p + f"self_attn.{proj}.weight": (d, d), p + f"self_attn.{proj}.bias": (d,)}
            shapes |= {p + "mlp.fc1.weight": (ff, d), p + "mlp.fc1.bias": (ff,),
                       p + "mlp.fc2.weight": (d, ff), p + "mlp.fc2.bias": (d,)}
    return shapes


def config(hidden_act="quick_gelu", eos_token_id=EOS) -> dict:
    return {
        "model_type": "clip", "projection_dim": PROJ,
        "text_config": {**TEXT, "hidden_act": hidden_act, "eos_token_id": eos_token_id},
        "vision_config": {**VISION, "hidden_act": hidden_act},
    }


def write_folder(folder, tensors, hidden_act="quick_gelu", tokenizer=True, **overrides):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**config(hidden_act), **overrides}))
    write_safetensors(folder / "model.safetensors", tensors)
    if tokenizer:
        write_tokenizer(folder)
    return folder


def random_tensors(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: np.asarray(0.3 * rng.normal(size=s) + ("norm" in k and k.endswith("weight")),
                          np.float32) for k, s in hf_shapes().items()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("clip"), random_tensors())


@pytest.fixture(scope="module")
def clip(folder):
    return CLIPEncoder.from_pretrained(folder)


def images(n, seed, size=SIZE):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


# -- torch-free ---------------------------------------------------------------------------
def test_loads_a_folder(clip, folder):
    assert clip.projection_dim == PROJ and clip.image_size == SIZE and clip.context_length == CTX
    assert (clip.image_mean, clip.image_std) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    tensors = random_tensors()
    chex.assert_trees_all_equal(clip.text.layers.fc1_weight[1],
                                tensors["text_model.encoder.layers.1.mlp.fc1.weight"])
    chex.assert_trees_all_equal(clip.vision.patch_weight,
                                tensors["vision_model.embeddings.patch_embedding.weight"])
    features = clip.image_features(images(3, 0))
    chex.assert_shape(features, (3, PROJ))
    assert features.dtype == np.float32 and np.all(np.isfinite(features))
    # The fingerprint follows the weights, and the normalisation a processor config sets.
    other = write_folder(folder.parent / "other", random_tensors(seed=1))
    assert CLIPEncoder.from_pretrained(other).fingerprint != clip.fingerprint
    other = write_folder(folder.parent / "processor", random_tensors())
    (other / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    normalised = CLIPEncoder.from_pretrained(other)
    assert (normalised.image_mean, normalised.image_std) == ((0.5,) * 3, (0.25,) * 3)
    assert normalised.fingerprint != clip.fingerprint
    chex.assert_trees_all_close(normalised.preprocess(np.zeros((1, SIZE, SIZE, 3))),
                                np.zeros((1, SIZE, SIZE, 3)))


def test_tokenizer_conventions(clip):
    ids, mask = clip.tokenize(CAPTIONS)
    chex.assert_shape((ids, mask), (len(CAPTIONS), CTX))
    assert ids.dtype == np.int32 and mask.dtype == bool
    lengths = mask.sum(1)
    assert np.all(ids[:, 0] == BOS)
    assert np.all(ids[np.arange(len(CAPTIONS)), lengths - 1] == EOS)  # the pooled token
    assert np.all(ids[~mask] == EOS)  # CLIP pads with its end-of-text token
    assert lengths[2] == 2  # the empty caption: start and end
    assert lengths[4] == CTX  # truncated, its end-of-text token kept
    np.testing.assert_array_equal(ids[0, :4], [BOS, VOCAB["a</w>"], VOCAB["red</w>"],
                                               VOCAB["circle</w>"]])
    with pytest.raises(ValueError, match="max_len"):
        clip.tokenize(CAPTIONS, CTX + 1)
    chex.assert_shape(clip.tokenize(CAPTIONS[:2], 8), (2, 8))


def test_padding_changes_nothing(clip):
    ids, mask = clip.tokenize(CAPTIONS[:3])
    other = np.where(mask, ids, np.random.default_rng(0).integers(0, VOCAB_SIZE - 1, ids.shape))
    ref = clip.text_features(ids, mask)
    # What follows the end-of-text token, and the length of the padding, are never read.
    chex.assert_trees_all_close(clip.text_features(other, mask), ref, atol=1e-6, rtol=1e-6)
    n = int(mask[1].sum())
    chex.assert_trees_all_close(clip.text_features(ids[1:2, :n], mask[1:2, :n])[0], ref[1],
                                atol=1e-5, rtol=1e-5)


def test_center_crop_and_batches(clip):
    square = images(4, 1)
    border = images(4, 2, size=SIZE + 16)
    # A wider image: its shorter side already fits, so it is only cropped, to its middle.
    wide = border[:, 8 : 8 + SIZE].copy()
    wide[:, :, 8 : 8 + SIZE] = square
    tall = np.swapaxes(wide, 1, 2).copy()
    tall[:, 8 : 8 + SIZE] = square
    ref = clip.image_features(square)
    chex.assert_trees_all_close(clip.image_features(wide), ref, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(clip.image_features(tall), ref, atol=1e-5, rtol=1e-5)
    # Each row depends on its image alone.
    chex.assert_trees_all_close(clip.image_features(square[2:3])[0], ref[2], atol=1e-5,
                                rtol=1e-5)
    # Other sizes are resampled; out-of-range values are clipped first.
    small = clip.image_features(images(2, 3, size=12))
    assert np.all(np.isfinite(small))
    chex.assert_trees_all_close(clip.image_features(3 * square[:1]),
                                clip.image_features(np.clip(3 * square[:1], -1, 1)))


def test_clip_features_feed_the_frechet_distance(clip):
    extractor = CLIPFeatures(clip, batch_size=16)
    assert extractor.name == f"clip-{clip.fingerprint}"
    first, second = images(40, 4), images(40, 5) * 0.5
    features = extractor(first)
    chex.assert_shape(features, (40, PROJ))
    assert features.dtype == np.float64
    # Batches (the last one padded) change nothing.
    chex.assert_trees_all_close(CLIPFeatures(clip, batch_size=7)(first), features,
                                atol=1e-5, rtol=1e-5)
    stats = feature_stats(extractor, first)
    assert stats.extractor == extractor.name and stats.count == 40
    assert stats.distance(feature_stats(extractor, first)) < 1e-9 * np.trace(stats.cov)
    assert stats.distance(feature_stats(extractor, second)) > 1e-2 * np.trace(stats.cov)
    # Other features are never compared with these.
    unit = CLIPFeatures(clip, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit(first), axis=1), 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="different features"):
        stats.distance(FeatureStats.from_features(unit(first), unit.name))


def test_clip_score_is_torchmetrics_formula(clip):
    pictures = images(5, 6)
    ids, mask = clip.tokenize(CAPTIONS)
    image = np.asarray(clip.image_features(pictures), np.float64)
    text = np.asarray(clip.text_features(ids, mask), np.float64)
    cos = np.sum(image * text, 1) / np.linalg.norm(image, axis=1) / np.linalg.norm(text, axis=1)
    scores = clip_scores(clip, pictures, CAPTIONS, batch_size=2)
    np.testing.assert_allclose(scores, 100 * cos, atol=1e-4)
    assert clip_score(clip, pictures, CAPTIONS) == pytest.approx(max(100 * cos.mean(), 0.0),
                                                                 abs=1e-4)
    with pytest.raises(ValueError, match="one caption per image"):
        clip_score(clip, pictures, CAPTIONS[:4])


def test_missing_and_foreign_folders(folder, tmp_path):
    with pytest.raises(MissingInputError, match="no CLIP folder"):
        CLIPEncoder.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(WeightError, match="no config.json"):
        CLIPEncoder.from_pretrained(tmp_path)
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 32}))
    with pytest.raises(WeightError, match="model_type 't5'.*CLIPModel folder"):
        CLIPEncoder.from_pretrained(t5)
    vision_only = write_folder(tmp_path / "vision", random_tensors(),
                               model_type="clip_vision_model")
    with pytest.raises(WeightError, match="model_type 'clip_vision_model'"):
        CLIPEncoder.from_pretrained(vision_only)
    with pytest.raises(WeightError, match="no \\*.safetensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text(json.dumps(config()))
        CLIPEncoder.from_pretrained(tmp_path / "empty")

    key = "vision_model.encoder.layers.1.self_attn.k_proj.bias"
    tensors = random_tensors()
    del tensors[key]
    with pytest.raises(WeightError, match=f"missing key '{key}'"):
        CLIPEncoder.from_pretrained(write_folder(tmp_path / "missing", tensors))
    tensors = random_tensors()
    tensors["text_model.encoder.layers.2.mlp.fc1.bias"] = tensors[
        "text_model.encoder.layers.1.mlp.fc1.bias"]
    with pytest.raises(WeightError, match="unused keys"):
        CLIPEncoder.from_pretrained(write_folder(tmp_path / "extra", tensors))
    # Older saves also hold position ids; they are buffers, not weights.
    tensors = random_tensors() | {"text_model.embeddings.position_ids": np.arange(CTX)[None]}
    CLIPEncoder.from_pretrained(write_folder(tmp_path / "old", tensors))
    no_text = {k: v for k, v in config().items() if k != "text_config"}
    (tmp_path / "old" / "config.json").write_text(json.dumps(no_text))
    with pytest.raises(WeightError, match="no text_config"):
        CLIPEncoder.from_pretrained(tmp_path / "old")
    with pytest.raises(WeightError, match="hidden_act 'tanh'"):
        CLIPEncoder.from_pretrained(write_folder(tmp_path / "act", random_tensors(), "tanh"))


def early_config() -> dict:
    """A config as early transformers versions saved it: `text_config_dict` beside a
    `text_config` that disagrees (and is overridden), defaults left out."""
    early = config("gelu")
    early["text_config_dict"] = {k: v for k, v in early["text_config"].items()
                                 if k != "hidden_act"}
    early["text_config"] = {**early["text_config"], "max_position_embeddings": CTX + 4}
    return early


def test_an_early_config_reads_as_transformers_reads_it(tmp_path):
    folder = write_folder(tmp_path / "early", random_tensors())
    (folder / "config.json").write_text(json.dumps(early_config()))
    clip = CLIPEncoder.from_pretrained(folder)
    assert clip.text.layers.activation == "quick_gelu"  # the default, as transformers has it
    assert clip.vision.layers.activation == "gelu" and clip.context_length == CTX


def test_a_folder_without_tokenizer_still_encodes_ids(tmp_path):
    clip = CLIPEncoder.from_pretrained(
        write_folder(tmp_path / "bare", random_tensors(), tokenizer=False))
    assert clip.tokenizer is None
    with pytest.raises(MissingInputError, match="vocab.json and merges.txt"):
        clip.tokenize(["a red circle"])
    with pytest.raises(MissingInputError):
        clip_score(clip, images(1, 0), ["a red circle"])
    ids = np.full((1, 4), EOS, np.int32)
    chex.assert_shape(clip.text_features(ids, np.ones((1, 4), bool)), (1, PROJ))


# -- against transformers (torch) ---------------------------------------------------------
def torch_clip(tmp_path, hidden_act="quick_gelu", eos_token_id=EOS, seed=0):
    """A random `transformers.CLIPModel` of the tiny config, saved with tokenizer files."""
    torch = pytest.importorskip("torch")
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = config(hidden_act, eos_token_id)
    model = CLIPModel(CLIPConfig(text_config=cfg["text_config"],
                                 vision_config=cfg["vision_config"],
                                 projection_dim=PROJ)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # off 1 and 0, so a dropped norm would show
                p.add_(0.2 * torch.randn_like(p))
    folder = tmp_path / f"torch-{hidden_act}-{eos_token_id}"
    model.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder)
    return model, folder


def pixel_values(x):
    """CLIPImageProcessor's normalisation of images in [-1, 1], in NumPy, as NCHW."""
    unit = (x.astype(np.float64) + 1) / 2
    return ((unit - OPENAI_CLIP_MEAN) / OPENAI_CLIP_STD).astype(np.float32).transpose(0, 3, 1, 2)


def text_batch():
    """Ids with padding: a full row, shorter ones, the end token alone, a row with two end
    tokens, one with none (pooled at position 0 by the current rule), and id 2 (the legacy
    rule's `eos_token_id`) among the tokens."""
    rng = np.random.default_rng(3)
    lengths = [CTX, 9, 3, 1, 6, CTX]
    ids = rng.integers(0, VOCAB_SIZE - 2, (len(lengths), CTX))
    for row, n in enumerate(lengths):
        ids[row, 0] = BOS
        ids[row, n - 1] = EOS
        ids[row, n:] = EOS
    ids[4, 2] = EOS
    ids[5, 0] = ids[5, -1] = 7  # neither start nor end token: no largest id at position 0
    ids[1, 4] = ids[2, 1] = 2
    mask = np.arange(CTX)[None, :] < np.asarray(lengths)[:, None]
    return ids.astype(np.int64), mask


@pytest.mark.reference
def test_the_layouts_agree(tmp_path):
    from transformers import CLIPConfig

    _, folder = torch_clip(tmp_path)
    saved = read_safetensors(folder / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == hf_shapes()
    (folder / "config.json").write_text(json.dumps(early_config()))
    theirs = CLIPConfig.from_pretrained(folder)
    assert (theirs.text_config.hidden_act, theirs.vision_config.hidden_act) == ("quick_gelu",
                                                                               "gelu")
    assert theirs.text_config.max_position_embeddings == CTX
    assert theirs.text_config.eos_token_id == EOS


@pytest.mark.reference
@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_image_features_match_transformers(hidden_act, tmp_path):
    torch = pytest.importorskip("torch")
    model, folder = torch_clip(tmp_path, hidden_act)
    x = images(4, 7)
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=torch.from_numpy(pixel_values(x)))
    ref = ref.pooler_output.numpy() if hasattr(ref, "pooler_output") else ref.numpy()
    ours = np.asarray(CLIPEncoder.from_pretrained(folder).image_features(x))
    print(f"{hidden_act}: image features, max abs error {np.abs(ours - ref).max():.2e}")
    chex.assert_trees_all_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.reference
@pytest.mark.parametrize("hidden_act,eos_token_id",
                         [("quick_gelu", EOS), ("gelu", EOS), ("quick_gelu", LEGACY_EOS)])
def test_text_features_match_transformers(hidden_act, eos_token_id, tmp_path):
    torch = pytest.importorskip("torch")
    model, folder = torch_clip(tmp_path, hidden_act, eos_token_id)
    ids, mask = text_batch()
    with torch.no_grad():
        ref = model.get_text_features(input_ids=torch.from_numpy(ids),
                                      attention_mask=torch.from_numpy(mask.astype(np.int64)))
    ref = ref.pooler_output.numpy() if hasattr(ref, "pooler_output") else ref.numpy()
    ours = np.asarray(CLIPEncoder.from_pretrained(folder).text_features(ids, mask))
    print(f"{hidden_act}, eos {eos_token_id}: text features, max abs error "
          f"{np.abs(ours - ref).max():.2e}")
    chex.assert_trees_all_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.reference
def test_captions_and_clip_score_match_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import CLIPTokenizerFast

    model, folder = torch_clip(tmp_path, seed=1)
    clip = CLIPEncoder.from_pretrained(folder)
    # As torchmetrics tokenizes: padded to the longest caption, truncated to the positions.
    tokens = CLIPTokenizerFast.from_pretrained(folder)(
        CAPTIONS, padding=True, truncation=True, max_length=CTX, return_tensors="pt")
    x = images(len(CAPTIONS), 8)
    with torch.no_grad():
        text = model.get_text_features(**tokens)
        image = model.get_image_features(pixel_values=torch.from_numpy(pixel_values(x)))
    text = text.pooler_output.numpy() if hasattr(text, "pooler_output") else text.numpy()
    image = image.pooler_output.numpy() if hasattr(image, "pooler_output") else image.numpy()
    chex.assert_trees_all_close(np.asarray(clip.caption_features(CAPTIONS)), text,
                                atol=1e-5, rtol=1e-5)
    text, image = text.astype(np.float64), image.astype(np.float64)
    score = 100 * np.sum(text * image, 1) / np.linalg.norm(text, axis=1) / np.linalg.norm(
        image, axis=1)
    np.testing.assert_allclose(clip_scores(clip, x, CAPTIONS), score, atol=1e-4)
    assert clip_score(clip, x, CAPTIONS) == pytest.approx(max(score.mean(), 0.0), abs=1e-4)


@pytest.mark.reference
def test_preprocessing_matches_clip_image_processor(clip):
    try:  # PIL's resampling, which transformers 5 keeps beside a torchvision one
        from transformers.models.clip.image_processing_pil_clip import (
            CLIPImageProcessorPil as Processor,
        )
    except ImportError:  # before transformers 5, CLIPImageProcessor used PIL
        from transformers import CLIPImageProcessor as Processor

    processor = Processor(size={"shortest_edge": SIZE},
                                   crop_size={"height": SIZE, "width": SIZE})
    rng = np.random.default_rng(9)

    def both(pixels):
        ref = processor(images=list(pixels), return_tensors="np")["pixel_values"]
        ours = np.asarray(clip.preprocess(pixels.astype(np.float32) / 127.5 - 1))
        return ours, ref.transpose(0, 2, 3, 1)

    # At the tower's size: nothing is resampled, the normalisation alone.
    ours, ref = both(rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8))
    chex.assert_trees_all_close(ours, ref, atol=1e-5, rtol=1e-5)
    # Resampled (smooth images): the processor rounds to 8 bits in each of PIL's two passes,
    # so values differ by about a level (measured: at most 1.05 / 255).
    for h, w in [(48, 64), (64, 40), (20, 28)]:
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        smooth = np.stack([np.sin(6 * xx + 1), np.cos(5 * yy), np.sin(3 * (xx + yy))], -1)
        ours, ref = both(np.round((smooth * 0.5 + 0.5) * 255).astype(np.uint8)[None])
        assert np.max(np.abs(ours - ref) * OPENAI_CLIP_STD) < 1.5 / 255


def test_the_towers_scanned_layers_declare_themselves_stacked(clip):
    from fluid.nn import stacked_paths

    leaves = jax.tree_util.tree_flatten_with_path(clip)[0]
    layers = {path for path, leaf in leaves
              if jax.tree_util.GetAttrKey("layers") in path and hasattr(leaf, "shape")}
    assert layers and set(stacked_paths(clip)) == layers
