"""From a `ModelConfig` to a `FluidModel`: resolve each spec through its registry."""

import dataclasses
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
from jax.typing import ArrayLike

from ._registry import SLOTS
from ._types import DISCRETE, Key
from .config import ComponentSpec, ModelConfig, TokenizerLossConfig
from .model import FluidModel, TokenEmbedding
from .text import CaptionTokenizer, TextAligner
from .tokenizers import AutoencoderObjective


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
        text_encoder.dim, config.width, config.aligner_depth, config.aligner_heads, key=k_align
    )
    embedding = TokenEmbedding(
        token_kind, token_dim, vocab_size if token_kind == DISCRETE else None, config.width,
        key=k_embed,
    )
    backbone = _build("backbone", config.backbone, {"dim": config.width, "seq_len": seq_len}, k_back)
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
