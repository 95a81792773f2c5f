"""The T5 text encoder and T5's caption tokenizer, against `transformers` on tiny random models.

Checkpoints are built here (no download): with torch, `transformers` models saved with
`save_pretrained(safe_serialization=True)`; without it, a fluid encoder written out in
Hugging Face's key layout, which is also how the loader's error messages are checked.
"""

import io
import json

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import sentencepiece as spm

from fluid._weights import WeightError, write_safetensors
from fluid.data.shapes import caption_corpus
from fluid.text import (
    TEXT_ENCODERS,
    T5CaptionTokenizer,
    T5TextEncoder,
    TextTokenizer,
    load_caption_tokenizer,
    train_text_tokenizer,
)
from fluid.text._t5 import relative_position_buckets

VOCAB, CTX = 100, 24  # CTX exceeds max distance 20: the clipped, logarithmic buckets are used
TINY = {
    "vocab_size": VOCAB, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 20,
}
LENGTHS = (CTX, 13, 5, 1)  # a full caption, two padded ones, EOS alone


def captions(seed=7):
    """Ids and masks of `LENGTHS` captions: pieces, EOS (id 1), then padding (id 0)."""
    ids = np.array(jr.randint(jr.key(seed), (len(LENGTHS), CTX), 3, VOCAB), np.int32)
    mask = np.arange(CTX)[None, :] < np.asarray(LENGTHS)[:, None]
    for row, n in enumerate(LENGTHS):
        ids[row, n - 1] = 1
        ids[row, n:] = 0
    return ids, mask


@eqx.filter_jit
def encode(encoder, ids, mask):
    return jax.vmap(encoder)(ids, mask)


def hf_tensors(enc: T5TextEncoder) -> dict[str, np.ndarray]:
    """A fluid encoder's parameters under `T5EncoderModel`'s key names."""
    out = {
        "shared.weight": enc.embed,
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": enc.relative_bias,
        "encoder.final_layer_norm.weight": enc.final_norm,
    }
    ffn = "layer.1.DenseReluDense"
    gated = enc.layers.wi_linear is not None
    for i in range(enc.num_layers):
        p = f"encoder.block.{i}."
        layer = jax.tree.map(lambda a, i=i: a[i], enc.layers)
        out[p + "layer.0.layer_norm.weight"] = layer.attn_norm
        for name in "qkvo":
            out[p + f"layer.0.SelfAttention.{name}.weight"] = getattr(layer, name)
        out[p + "layer.1.layer_norm.weight"] = layer.ff_norm
        out[p + f"{ffn}.{'wi_0' if gated else 'wi'}.weight"] = layer.wi
        if gated:
            out[p + f"{ffn}.wi_1.weight"] = layer.wi_linear
        out[p + f"{ffn}.wo.weight"] = layer.wo
    return {k: np.asarray(v) for k, v in out.items()}


def write_folder(folder, tensors, feed_forward_proj="gated-gelu", **config):
    folder.mkdir(exist_ok=True)
    config = {"model_type": "t5", **TINY, "feed_forward_proj": feed_forward_proj, **config}
    (folder / "config.json").write_text(json.dumps(config))
    write_safetensors(folder / "model.safetensors", tensors)
    return folder


@pytest.fixture(scope="module")
def random_encoder():
    enc = T5TextEncoder(**TINY, feed_forward_proj="gated-gelu", key=jr.key(0))
    # Move the unit norm weights off 1, so a loader that dropped one would be caught.
    return eqx.tree_at(
        lambda e: (e.final_norm, e.layers.attn_norm, e.layers.ff_norm),
        enc,
        replace_fn=lambda w: w + 0.2 * jr.normal(jr.key(1), w.shape),
    )


# -- torch-free ---------------------------------------------------------------------------
def test_round_trip_through_a_folder(random_encoder, tmp_path):
    folder = write_folder(tmp_path / "enc", hf_tensors(random_encoder))
    loaded = TEXT_ENCODERS.build("t5", path=str(folder), vocab_size=VOCAB, max_len=CTX)
    assert isinstance(loaded, T5TextEncoder) and not loaded.trainable
    assert loaded.dim == 32 and loaded.vocab_size == VOCAB
    chex.assert_trees_all_equal(
        eqx.filter(loaded, eqx.is_array), eqx.filter(random_encoder, eqx.is_array)
    )
    chex.assert_trees_all_equal(eqx.filter(loaded, eqx.is_array, inverse=True),
                                eqx.filter(random_encoder, eqx.is_array, inverse=True))


def test_padding_changes_nothing_at_real_positions(random_encoder):
    ids, mask = captions()
    other = np.where(mask, ids, np.asarray(jr.randint(jr.key(3), ids.shape, 0, VOCAB)))
    out, out_other = encode(random_encoder, ids, mask), encode(random_encoder, other, mask)
    chex.assert_trees_all_equal(out, out_other)
    assert jnp.all(jnp.where(mask[..., None], True, out == 0.0))
    # ...nor does the amount of padding: a 5-token caption alone gives the same vectors.
    alone = random_encoder(jnp.asarray(ids[2, :5]), jnp.asarray(mask[2, :5]))
    chex.assert_trees_all_close(alone, out[2, :5], atol=1e-5, rtol=1e-5)


def test_jit_equals_eager(random_encoder):
    ids, mask = captions()
    eager = jnp.stack([random_encoder(jnp.asarray(i), jnp.asarray(m)) for i, m in zip(ids, mask)])
    chex.assert_trees_all_close(encode(random_encoder, ids, mask), eager, atol=1e-5, rtol=1e-5)


def test_tied_embeddings_and_decoder_keys(random_encoder, tmp_path):
    tensors = hf_tensors(random_encoder)
    # An older T5ForConditionalGeneration save: both embedding names, a decoder, an lm_head.
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
    tensors["decoder.embed_tokens.weight"] = tensors["shared.weight"]
    tensors["decoder.final_layer_norm.weight"] = tensors["encoder.final_layer_norm.weight"]
    tensors["lm_head.weight"] = tensors["shared.weight"]
    loaded = T5TextEncoder.from_pretrained(write_folder(tmp_path / "all", tensors))
    chex.assert_trees_all_equal(loaded.embed, random_encoder.embed)
    # Only the encoder's own name of the embedding.
    tensors = hf_tensors(random_encoder)
    tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
    loaded = T5TextEncoder.from_pretrained(write_folder(tmp_path / "enc", tensors))
    chex.assert_trees_all_equal(loaded.embed, random_encoder.embed)


def test_missing_misshaped_and_unused_keys_are_named(random_encoder, tmp_path):
    key = "encoder.block.1.layer.0.SelfAttention.k.weight"
    tensors = hf_tensors(random_encoder)
    del tensors[key]
    with pytest.raises(WeightError, match=f"missing key '{key}'"):
        T5TextEncoder.from_pretrained(write_folder(tmp_path / "missing", tensors))

    tensors = hf_tensors(random_encoder)
    tensors[key] = tensors[key][:, :-1]
    with pytest.raises(WeightError, match=rf"key '{key}' has shape \(32, 31\)"):
        T5TextEncoder.from_pretrained(write_folder(tmp_path / "shape", tensors))

    tensors = hf_tensors(random_encoder)
    del tensors["shared.weight"]
    with pytest.raises(WeightError, match="missing key 'shared.weight'"):
        T5TextEncoder.from_pretrained(write_folder(tmp_path / "embed", tensors))

    tensors = hf_tensors(random_encoder)
    extra = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
    tensors[extra] = tensors["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    with pytest.raises(WeightError, match=f"unused keys \\({extra}\\)"):
        T5TextEncoder.from_pretrained(write_folder(tmp_path / "extra", tensors))

    # The config decides the variant: a gated checkpoint read as "relu" lacks `wi`.
    folder = write_folder(tmp_path / "relu", hf_tensors(random_encoder), "relu")
    with pytest.raises(WeightError, match="DenseReluDense.wi.weight"):
        T5TextEncoder.from_pretrained(folder)


def test_arguments_are_checked(random_encoder, tmp_path):
    folder = write_folder(tmp_path / "enc", hf_tensors(random_encoder))
    with pytest.raises(TypeError, match="d_model"):
        T5TextEncoder(path=str(folder), d_model=32)
    with pytest.raises(ValueError, match="tokenizer has 101 ids"):
        T5TextEncoder(path=str(folder), vocab_size=VOCAB + 1)
    with pytest.raises(ValueError, match="dtype"):
        T5TextEncoder.from_pretrained(folder, dtype="float16")
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5TextEncoder(vocab_size=VOCAB, feed_forward_proj="gated-gelu-x", key=jr.key(0))
    (folder / "config.json").write_text(json.dumps({"model_type": "umt5", **TINY}))
    with pytest.raises(WeightError, match="umt5"):
        T5TextEncoder.from_pretrained(folder)


def test_bfloat16(random_encoder, tmp_path):
    folder = write_folder(tmp_path / "enc", hf_tensors(random_encoder))
    half = T5TextEncoder.from_pretrained(folder, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(eqx.filter(half, eqx.is_array))} == {jnp.dtype(jnp.bfloat16)}
    ids, mask = captions()
    out = encode(half, ids, mask)
    assert out.dtype == jnp.bfloat16 and jnp.all(jnp.isfinite(out.astype(jnp.float32)))


# -- tokenizer ----------------------------------------------------------------------------
CORPUS = caption_corpus(300)


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    """A T5-style SentencePiece model (pad 0, eos 1, unk 2, no BOS) in a folder."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=80, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2,
    )
    folder = tmp_path_factory.mktemp("t5tok")
    (folder / "spiece.model").write_bytes(model.getvalue())
    return folder


def test_tokenizer_matches_transformers(spiece):
    from transformers import T5Tokenizer

    ours = T5CaptionTokenizer.from_pretrained(spiece)
    theirs = T5Tokenizer.from_pretrained(str(spiece))
    texts = ["", *CORPUS[:200], "A  Red   circle, LEFT of a zebra!", " ünïcode \t 123 "]
    for length in (1, 8, 32):
        ids, mask = ours.encode(texts, length)
        ref = theirs(texts, padding="max_length", truncation=True, max_length=length)
        np.testing.assert_array_equal(ids, np.asarray(ref["input_ids"]))
        np.testing.assert_array_equal(mask, np.asarray(ref["attention_mask"], bool))
    assert ids.dtype == np.int32 and mask.dtype == bool


def test_tokenizer_conventions(spiece):
    tok = T5CaptionTokenizer.from_pretrained(spiece / "spiece.model")
    ids, mask = tok.encode(["", "a red circle", CORPUS[0] + " " + CORPUS[1]], 6)
    np.testing.assert_array_equal(ids[0], [1, 0, 0, 0, 0, 0])  # the empty caption: EOS alone
    np.testing.assert_array_equal(mask[0], [True, False, False, False, False, False])
    n = int(mask[1].sum())
    assert ids[1, n - 1] == 1 and np.all(ids[1, n:] == 0) and np.all(ids[1, : n - 1] > 2)
    assert mask[2].all() and ids[2, -1] == 1  # truncated, EOS kept
    assert tok.decode(ids[1]) == "a red circle" and tok.decode(ids)[0] == ""
    assert ids.max() < tok.vocab_size
    assert T5CaptionTokenizer.from_bytes(tok.to_bytes()).encode(["a"], 4)[0].tolist() == (
        tok.encode(["a"], 4)[0].tolist()
    )
    with pytest.raises(ValueError, match="eos_id=1"):
        T5CaptionTokenizer(train_text_tokenizer(CORPUS[:50], vocab_size=32).to_bytes())


def test_a_t5_spec_with_a_folder_brings_its_own_caption_tokenizer(spiece):
    own = T5TextEncoder.caption_tokenizer({"path": str(spiece), "dtype": "float32"})
    assert isinstance(own, T5CaptionTokenizer)
    assert own.to_bytes() == (spiece / "spiece.model").read_bytes()
    # A random T5 (no folder) reads any vocabulary: fluid trains one on the captions.
    assert T5TextEncoder.caption_tokenizer({"vocab_size": 64}) is None
    assert TEXT_ENCODERS.get("learned").caption_tokenizer({"dim": 8}) is None


def test_a_saved_t5_tokenizer_loads_back_as_its_class(spiece, tmp_path):
    tok = T5CaptionTokenizer.from_pretrained(spiece)
    tok.save(tmp_path / "text_tokenizer.model")
    assert json.loads((tmp_path / "text_tokenizer.json").read_text()) == {"caption_tokenizer": "t5"}
    loaded = load_caption_tokenizer(tmp_path / "text_tokenizer.model")
    assert type(loaded) is T5CaptionTokenizer and loaded.to_bytes() == tok.to_bytes()
    # The record decides, not the special ids: naming fluid's own class refuses T5's ids.
    (tmp_path / "text_tokenizer.json").write_text('{"caption_tokenizer": "sentencepiece"}')
    with pytest.raises(ValueError, match="pad_id=0, bos_id=1, eos_id=2"):
        load_caption_tokenizer(tmp_path / "text_tokenizer.model")


def test_a_run_folder_without_a_record_still_loads_its_t5_tokenizer(spiece, tmp_path):
    # Run folders written before the record hold the SentencePiece model alone.
    (tmp_path / "text_tokenizer.model").write_bytes((spiece / "spiece.model").read_bytes())
    assert type(load_caption_tokenizer(tmp_path / "text_tokenizer.model")) is T5CaptionTokenizer
    (tmp_path / "own.model").write_bytes(train_text_tokenizer(CORPUS, vocab_size=32).to_bytes())
    assert type(load_caption_tokenizer(tmp_path / "own.model")) is TextTokenizer


PLUGIN_TEXT_ENCODER = """
import typing
import jax.numpy as jnp
from fluid import AbstractTextEncoder
from fluid.text import T5CaptionTokenizer

@typing.final
class VocabEncoder(AbstractTextEncoder):
    vocab_size: int = 8
    dim: int = 4
    trainable: bool = False

    def __init__(self, vocab: str, vocab_size: int = 8, max_len: int = 4):
        self.vocab_size = vocab_size

    @classmethod
    def caption_tokenizer(cls, kwargs):
        return T5CaptionTokenizer.from_pretrained(kwargs["vocab"])

    def __call__(self, ids, mask):
        return jnp.zeros((ids.shape[0], self.dim))
"""


def test_a_text_encoder_plugin_brings_its_caption_tokenizer(spiece, tmp_path, monkeypatch):
    from _plugins import make_distribution

    from fluid.config import ComponentSpec, ModelConfig
    from fluid.data.shapes import ShapesDataset
    from fluid.recipes import caption_tokenizer

    make_distribution(tmp_path, "vocab-encoder", {"fluid.text_encoders": {
        "vocab": "vocab_encoder_mod:VocabEncoder"}}, {"vocab_encoder_mod": PLUGIN_TEXT_ENCODER})
    monkeypatch.syspath_prepend(str(tmp_path))
    TEXT_ENCODERS.refresh()
    try:
        model = ModelConfig(text_encoder=ComponentSpec(name="vocab",
                                                       kwargs={"vocab": str(spiece)}))
        tok = caption_tokenizer(ShapesDataset(16), model)
        assert isinstance(tok, T5CaptionTokenizer)
        assert tok.to_bytes() == (spiece / "spiece.model").read_bytes()
    finally:
        monkeypatch.undo()
        TEXT_ENCODERS.refresh()


# -- against transformers (torch) ---------------------------------------------------------
def torch_model(cls, feed_forward_proj, seed=0, **config):
    torch = pytest.importorskip("torch")
    from transformers import T5Config

    torch.manual_seed(seed)
    model = cls(T5Config(**TINY, feed_forward_proj=feed_forward_proj, **config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def max_error(ours, theirs, mask):
    return float(np.max(np.abs(np.where(mask[..., None], np.asarray(ours) - theirs, 0.0))))


@pytest.mark.reference
def test_buckets_match_transformers():
    torch = pytest.importorskip("torch")
    from transformers.models.t5.modeling_t5 import T5Attention

    ctx = 300
    for buckets, distance in [(32, 128), (32, 20), (64, 256), (8, 16)]:
        pos = torch.arange(ctx)
        ref = T5Attention._relative_position_bucket(
            pos[None, :] - pos[:, None], True, buckets, distance
        )
        np.testing.assert_array_equal(
            relative_position_buckets(ctx, buckets, distance), ref.numpy()
        )


@pytest.mark.reference
@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_matches_transformers_encoder(feed_forward_proj, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import T5EncoderModel

    model = torch_model(T5EncoderModel, feed_forward_proj)
    model.save_pretrained(tmp_path, safe_serialization=True)
    ids, mask = captions()
    with torch.no_grad():
        ref = model(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
        ).last_hidden_state.numpy()

    encoder = TEXT_ENCODERS.build("t5", path=str(tmp_path), vocab_size=VOCAB, max_len=CTX)
    ours = encode(encoder, ids, mask)
    print(f"{feed_forward_proj}: max abs error {max_error(ours, ref, mask):.2e}")
    chex.assert_trees_all_close(
        jnp.where(mask[..., None], ours, 0.0), np.where(mask[..., None], ref, 0.0),
        atol=1e-5, rtol=1e-5,
    )


@pytest.mark.reference
def test_loads_the_encoder_of_a_conditional_generation_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import T5ForConditionalGeneration

    model = torch_model(T5ForConditionalGeneration, "relu", seed=1, num_decoder_layers=1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    ids, mask = captions(8)
    with torch.no_grad():
        ref = model.get_encoder()(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
        ).last_hidden_state.numpy()
    ours = encode(T5TextEncoder.from_pretrained(tmp_path), ids, mask)
    chex.assert_trees_all_close(
        jnp.where(mask[..., None], ours, 0.0), np.where(mask[..., None], ref, 0.0),
        atol=1e-5, rtol=1e-5,
    )


def test_the_encoders_scanned_layers_declare_themselves_stacked():
    # The sharding rules find stacks by the `fluid.nn.stacked_field` marker: every leaf
    # of the scanned `layers`, and nothing else.
    from fluid.nn import stacked_paths

    enc = T5TextEncoder(vocab_size=50, max_len=8, key=jr.key(0))
    leaves = jax.tree_util.tree_flatten_with_path(enc)[0]
    under_layers = {path for path, leaf in leaves if path[0] == jax.tree_util.GetAttrKey("layers")
                    and eqx.is_array(leaf)}
    assert under_layers and set(stacked_paths(enc)) == under_layers
