"""From a `ModelConfig` to a `FluidModel`: resolve each spec through its registry. And from
MAR's checkpoint to the parts it holds (`load_mar`) and to the `FluidModel` it is
(`mar_model`)."""

import dataclasses
import typing
from collections.abc import Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.typing import ArrayLike

from ._registry import SLOTS
from ._types import CONTINUOUS, DISCRETE, Key
from ._weights import StateDict, WeightError
from .backbones import MaskedAutoencoder, load_mar_backbone
from .config import ComponentSpec, ModelConfig, TokenizerLossConfig
from .heads import DiffusionHead, load_mar_diffloss
from .model import FluidModel, TokenEmbedding
from .nn import add_lora
from .orders import RandomOrder
from .text import (
    CaptionTokenizer,
    ClassLabelEncoder,
    ClassLabelTokenizer,
    TextAligner,
    load_mar_class_labels,
)
from .tokenizers import AbstractImageTokenizer, AutoencoderObjective


def _build(slot: str, spec: ComponentSpec, derived: dict, key: Key):
    # `derived`: a value for each argument `SLOTS[slot].derived` names (checked there).
    return SLOTS[slot].build(spec, derived, key=key)


def _pretrained(spec) -> bool:
    # A spec with a `path` loads weights from disk: built outside any jit, which would
    # otherwise bake every weight into the compiled program as a constant.
    return "path" in spec.kwargs


def _build_text_encoder(config, text_vocab_size, key):
    return _build(
        "text_encoder",
        config.text_encoder,
        {"vocab_size": text_vocab_size, "max_len": config.text_len},
        key,
    )


# Built under one jit per configuration: initialising eagerly compiles every primitive of
# every shape one at a time, which costs tens of seconds per model on a 2-core CPU.
@eqx.filter_jit
def _build_parts(config, token_kind, token_dim, vocab_size, seq_len, text_vocab_size, key,
                 text_encoder=None):
    k_text, k_align, k_embed, k_back, k_head, k_order = jr.split(key, 6)
    if text_encoder is None:
        text_encoder = _build_text_encoder(config, text_vocab_size, k_text)
    aligner = TextAligner(
        text_encoder.dim, config.width, config.aligner_depth, config.aligner_heads,
        identity=config.aligner == "identity", key=k_align,
    )
    embedding = TokenEmbedding(
        token_kind, token_dim, vocab_size if token_kind == DISCRETE else None, config.width,
        normalize=config.token_norm, key=k_embed,
    )
    backbone = _build("backbone", config.backbone, {"dim": config.width, "seq_len": seq_len}, k_back)
    if config.lora_rank:
        # Its own key (folded, not split), so every other part initialises as without LoRA.
        alpha = config.lora_rank if config.lora_alpha is None else config.lora_alpha
        backbone = add_lora(backbone, config.lora_rank, float(alpha), key=jr.fold_in(k_back, 1))
    head = _build(
        "head",
        config.head,
        {"cond_dim": config.width, "token_dim": token_dim, "vocab_size": vocab_size},
        k_head,
    )
    order = _build("order", config.order, {}, k_order)
    return text_encoder, aligner, embedding, backbone, head, order


def build_model(
    config: ModelConfig,
    *,
    text_tokenizer: CaptionTokenizer,
    key: Key,
    fit_images: np.ndarray | Sequence[np.ndarray] | None = None,
) -> FluidModel:
    """Build every part of `config` and compose them.

    **Arguments:**

    - `config`: the model configuration.
    - `text_tokenizer`: the caption tokenizer; gives the text vocabulary size and the empty
      caption used for guidance.
    - `key`: initialisation key.
    - `fit_images`: `[N, h, w, 3]` images in [-1, 1] for tokenizers fitted to data (the
      `palette` codebook); ignored by tokenizers that need no fitting.
    """
    null_ids, null_mask = text_tokenizer.encode([""], config.text_len)
    return compose(
        config,
        text_vocab_size=text_tokenizer.vocab_size,
        null_text=(null_ids[0], null_mask[0]),
        key=key,
        fit_images=fit_images,
    )


def compose(
    config: ModelConfig,
    *,
    text_vocab_size: int,
    null_text: tuple[ArrayLike, ArrayLike],
    key: Key,
    fit_images: np.ndarray | Sequence[np.ndarray] | None = None,
) -> FluidModel:
    """`build_model` given the text vocabulary size and the empty caption's `(ids, mask)`."""
    k_tok, k_fit, k_parts = jr.split(key, 3)
    tokenizer = _build("tokenizer", config.tokenizer, {}, k_tok)
    if fit_images is not None:
        tokenizer = tokenizer.fit(np.asarray(fit_images, np.float32), key=k_fit)
    pretrained_text = None
    if _pretrained(config.text_encoder):
        pretrained_text = _build_text_encoder(config, text_vocab_size, jr.fold_in(k_parts, 1))
    text_encoder, aligner, embedding, backbone, head, order = _build_parts(
        config,
        tokenizer.token_kind,
        tokenizer.token_dim,
        tokenizer.vocab_size,
        tokenizer.seq_len,
        text_vocab_size,
        k_parts,
        pretrained_text,
    )
    return FluidModel(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        aligner=aligner,
        token_embedding=embedding,
        backbone=backbone,
        head=head,
        order=order,
        null_text=null_text,
        caption_dropout=config.caption_dropout,
    )


def build_objective(
    tokenizer: ComponentSpec, loss: TokenizerLossConfig, *, key: Key
) -> AutoencoderObjective:
    """The objective of a tokenizer run (`TrainConfig(task="tokenizer")`): the tokenizer of
    `tokenizer` (random weights, or a diffusers folder's with `path`) and the loss `loss`.
    """
    return AutoencoderObjective(
        _build("tokenizer", tokenizer, {}, key),
        reconstruction=loss.reconstruction,
        kl_weight=loss.kl_weight,
        beta=loss.beta,
    )


def abstract_model(config: ModelConfig, *, text_vocab_size: int | None = None) -> FluidModel:
    """The model's structure with `jax.ShapeDtypeStruct` leaves: no weights allocated."""
    vocab = text_vocab_size or config.text_vocab_size
    null_ids = np.zeros((config.text_len,), np.int32)
    null_mask = np.arange(config.text_len) < 1
    # `filter_`: parts may hold non-array leaves (a plug-in's activation function).
    return eqx.filter_eval_shape(
        lambda k: compose(config, text_vocab_size=vocab, null_text=(null_ids, null_mask), key=k),
        jr.key(0),
    )


def count_params(tree) -> int:
    """Number of floating-point parameters in a model or its abstract structure."""
    leaves = jax.tree_util.tree_leaves(tree)
    return int(
        sum(
            np.prod(x.shape)
            for x in leaves
            if isinstance(x, (jax.Array, jax.ShapeDtypeStruct, np.ndarray))
            and np.issubdtype(x.dtype, np.floating)
        )
    )


def non_embedding_params(model: FluidModel) -> int:
    """Parameters that scale with the model: the backbone's, the head's and the text aligner's,
    without the backbone's learned embeddings (its fields named `*_embed`: position, mask
    and start embeddings).

    Left out as well: the token embedding and the text encoder (fixed across a sweep's sizes,
    and frozen in Fluid). The head counts whole (a softmax head's output projection too).
    Works on a model or on `abstract_model`'s structure.
    """
    backbone = model.backbone
    embeddings = [
        getattr(backbone, f.name)
        for f in dataclasses.fields(backbone)
        if f.name.endswith("_embed")
    ]
    return (
        count_params(backbone) - count_params(embeddings)
        + count_params(model.head) + count_params(model.aligner)
    )


# -- MAR's checkpoints ----------------------------------------------------------------------
@typing.final
class MarParts(eqx.Module):
    """The parts of one MAR model (`load_mar`).

    - `token_projection`: MAR's `z_proj`, token to width. MAR normalises after adding the
      position embedding (the backbone's `input_norm`), not right after this map as
      `fluid.model.TokenEmbedding` does, so the backbone takes `dense(token_projection, t)`.
    - `labels`: the class embeddings and the fake (unconditional) one.
    - `backbone`: the encoder-decoder.
    - `head`: the diffusion head.
    """

    token_projection: eqx.nn.Linear
    labels: ClassLabelEncoder
    backbone: MaskedAutoencoder
    head: DiffusionHead


def _shape(state: StateDict, name: str) -> tuple[int, ...]:
    if name not in state:
        raise WeightError(f"{state.source}: missing key {name!r}; is this MAR's state dict "
                          "(checkpoint['model'] or ['model_ema'])?")
    return tuple(state.tensors[name].shape)


def _count(state: StateDict, pattern: str) -> int:
    n = 0
    while pattern.format(n) in state:
        n += 1
    return n


def load_mar(
    tensors: Mapping[str, np.ndarray],
    *,
    num_heads: int,
    batch_mul: int = 4,
    sampling_steps: int = 100,
    source: str = "MAR checkpoint",
) -> MarParts:
    """Every part of a MAR model (LTH14/mar, `models/mar.py`) from its state dict.

    Sizes are read from the tensors (width, depths, sequence, buffer, token channels,
    classes, the head's width and depth); every tensor must be used by some part, and each
    must have its part's shape, or `WeightError` names the first that does not. The parts
    are built as shapes only (`eqx.filter_eval_shape`), so no random initialisation runs.

    **Arguments:**

    - `tensors`: MAR's `checkpoint["model"]` (or `["model_ema"]`) as NumPy arrays, names as
      MAR's (from a safetensors file: `fluid._weights.read_safetensors`).
    - `num_heads`: attention heads of the encoder and decoder (16 for MAR-L and MAR-H, 12
      for MAR-B): not recorded in the weights.
    - `batch_mul`: the head's `(t, noise)` draws per position in training (MAR's
      `diffusion_batch_mul`, 4).
    - `sampling_steps`: the head's respaced sampling steps (MAR's `num_sampling_steps`).
    - `source`: where the tensors came from, for messages.

    **Returns:**

    A `MarParts` in float32. For classifier-free guidance, the unconditional input is the
    fake embedding: `labels` of the null id `labels.num_classes`.
    """
    state = StateDict(tensors, source=source)
    dim = _shape(state, "encoder_norm.weight")[0]
    seq_len = _shape(state, "diffusion_pos_embed_learned")[1]
    buffer_size = _shape(state, "encoder_pos_embed_learned")[1] - seq_len
    depth = _count(state, "encoder_blocks.{}.norm1.weight")
    decoder_depth = _count(state, "decoder_blocks.{}.norm1.weight")
    mlp_ratio = _shape(state, "encoder_blocks.0.mlp.fc1.weight")[0] / dim if depth else 4.0
    token_dim = _shape(state, "z_proj.weight")[1]
    num_classes = _shape(state, "class_emb.weight")[0]
    head_width = _shape(state, "diffloss.net.cond_embed.weight")[0]
    head_depth = _count(state, "diffloss.net.res_blocks.{}.in_ln.weight")

    def skeletons(key):
        k_proj, k_labels, k_backbone, k_head = jr.split(key, 4)
        return MarParts(
            token_projection=eqx.nn.Linear(token_dim, dim, key=k_proj),
            labels=ClassLabelEncoder(num_classes, dim, key=k_labels),
            backbone=MaskedAutoencoder(
                dim, depth, num_heads, seq_len, mlp_ratio, decoder_depth=decoder_depth,
                buffer_size=buffer_size, key=k_backbone,
            ),
            head=DiffusionHead(
                dim, token_dim, head_width, head_depth, sampling_steps=sampling_steps,
                batch_mul=batch_mul, key=k_head,
            ),
        )

    parts = eqx.filter_eval_shape(skeletons, jr.key(0))
    weight = state.take("z_proj.weight", (dim, token_dim))
    bias = state.take("z_proj.bias", (dim,))
    token_projection = eqx.tree_at(
        lambda m: (m.weight, m.bias), parts.token_projection,
        (jnp.asarray(weight, jnp.float32), jnp.asarray(bias, jnp.float32)),
    )
    labels = load_mar_class_labels(parts.labels, state)
    backbone = load_mar_backbone(parts.backbone, state)
    diffloss = {k: state.take(k) for k in state.unused() if k.startswith("diffloss.net.")}
    head = load_mar_diffloss(parts.head, diffloss, prefix="diffloss.net.")
    state.finish()
    loaded = MarParts(token_projection, labels, backbone, head)
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(loaded)):
        raise AssertionError("load_mar left a parameter unloaded")  # a bug of the layouts
    return loaded


def mar_model(
    tensors: Mapping[str, np.ndarray],
    *,
    num_heads: int,
    tokenizer: AbstractImageTokenizer,
    batch_mul: int = 4,
    sampling_steps: int = 100,
    text_len: int = 2,
    caption_dropout: float = 0.1,
    source: str = "MAR checkpoint",
) -> FluidModel:
    """A MAR model (LTH14/mar, `models/mar.py`) as a `FluidModel` that computes what MAR's
    code computes: in training (`loss`, `loss_terms`) and in sampling (`generate`).

    The composition: MAR's class embeddings as the text encoder (`ClassLabelEncoder`; its
    captions are class numbers, `ClassLabelTokenizer`, and `""` is the unconditional
    "fake" class), an identity aligner, MAR's `z_proj` as a token embedding without a
    LayerNorm (MAR normalises after adding positions, inside the backbone), the `mae`
    backbone with MAR's dropout (0.1; on in `loss_terms`), the diffusion head, and the
    random order with MAR's mask ratios (`RandomOrder("mar")`). Label dropout is the
    model's caption dropout (MAR's `label_drop_prob`, 0.1).

    **Arguments:**

    - `tensors`, `num_heads`, `batch_mul`, `sampling_steps`, `source`: as `load_mar`.
    - `tokenizer`: the image tokenizer, whose tokens must be MAR's: for MAR's released
      models `fluid.tokenizers.KLTokenizer(**MAR_KL16, path=folder)` with MAR's kl16.ckpt
      converted (`fluid.tokenizers.convert_ldm_checkpoint`).
    - `text_len`: caption ids per example (the empty caption's length).
    - `caption_dropout`: the label dropout of training.

    **Returns:**

    The model, in float32. Its caption tokenizer is
    `ClassLabelTokenizer(model.text_encoder.num_classes)`.
    """
    parts = load_mar(tensors, num_heads=num_heads, batch_mul=batch_mul,
                     sampling_steps=sampling_steps, source=source)
    backbone = parts.backbone
    token_dim = parts.token_projection.in_features
    if (tokenizer.token_kind, tokenizer.token_dim, tokenizer.seq_len) != (
        CONTINUOUS, token_dim, backbone.seq_len
    ):
        raise ValueError(
            f"{source} takes {backbone.seq_len} continuous tokens of {token_dim} channels; the "
            f"tokenizer {type(tokenizer).__name__} makes {tokenizer.seq_len} "
            f"{tokenizer.token_kind} tokens of {tokenizer.token_dim}."
        )
    embedding = eqx.filter_eval_shape(
        lambda k: TokenEmbedding(CONTINUOUS, token_dim, None, backbone.dim, normalize=False,
                                 key=k),
        jr.key(0),
    )
    embedding = eqx.tree_at(lambda e: e.layer, embedding, parts.token_projection)
    null_ids, null_mask = ClassLabelTokenizer(parts.labels.num_classes).encode([""], text_len)
    return FluidModel(
        tokenizer=tokenizer,
        text_encoder=parts.labels,
        aligner=TextAligner(backbone.dim, backbone.dim, 0, 1, identity=True, key=jr.key(0)),
        token_embedding=embedding,
        backbone=backbone,
        head=parts.head,
        order=RandomOrder(mask_schedule="mar"),
        null_text=(null_ids[0], null_mask[0]),
        caption_dropout=caption_dropout,
    )
