import abc
from collections.abc import Mapping
from typing import Any

import equinox as eqx
from jaxtyping import Array, Float

from .._types import TextIds, TextMask
from ._caption_tokenizer import AbstractCaptionTokenizer


class AbstractTextEncoder(eqx.Module):
    """Maps the token ids of one caption to one vector per text token.

    `vocab_size` is the size of the id space the encoder reads, `dim` the width of its
    outputs, and `trainable` whether the trainer may update it (a pretrained T5 is frozen:
    the model wraps its output in `jax.lax.stop_gradient` and the trainer leaves it out).
    Padding positions (`mask == False`) must not influence the outputs at real positions.
    """

    vocab_size: eqx.AbstractVar[int]
    dim: eqx.AbstractVar[int]
    trainable: eqx.AbstractVar[bool]

    @classmethod
    @abc.abstractmethod
    def caption_tokenizer(cls, kwargs: Mapping[str, Any]) -> AbstractCaptionTokenizer | None:
        """The caption tokenizer that an encoder built from a spec's `kwargs` reads ids of.

        **Arguments:**

        - `kwargs`: the spec's keyword arguments (`ModelConfig.text_encoder.kwargs`).

        **Returns:**

        The tokenizer of the encoder's own vocabulary (a pretrained T5's `spiece.model`), or
        `None`: the encoder learns its embeddings, and fluid trains a SentencePiece tokenizer
        of `ModelConfig.text_vocab_size` ids on the training captions. Called on the host,
        before the encoder is built.
        """

    @abc.abstractmethod
    def __call__(self, ids: TextIds, mask: TextMask) -> Float[Array, "ctx text_dim"]:
        """Encode one caption (`ids` padded to a fixed length, `mask` True at real tokens)."""
