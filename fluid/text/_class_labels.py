"""Class labels as the condition (MAR's ImageNet models): a caption is a label's number."""

import difflib
import json
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float

from .._errors import ConfigError
from .._types import Key, TextIds, TextMask
from .._weights import StateDict
from ..nn import embedding
from ._abstract import AbstractTextEncoder
from ._caption_tokenizer import AbstractCaptionTokenizer


def _listing(names: Sequence[str], shown: int = 8) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown
                                       else "")


@typing.final
class ClassLabelTokenizer(AbstractCaptionTokenizer):
    """Captions that are class labels: `"207"` is class 207, `""` is no class.

    A caption becomes one real token, its label (`""` becomes the null id `num_classes`,
    the unconditional input of guidance); the rest of the row is padding. Any other caption
    is refused, so a caption file of class names fails loudly instead of being misread.

    **Arguments:**

    - `num_classes`: number of classes (ids `0 .. num_classes - 1`).
    - `class_names`: optionally, the names of the first classes, in id order (an
      ImageFolder's folder names), saved with the tokenizer so that `label` (and
      `fluid sample --class`) also takes a name.
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}.")
        self.num_classes = int(num_classes)
        names = None if class_names is None else tuple(str(n) for n in class_names)
        if names is not None:
            if len(names) > self.num_classes:
                raise ValueError(f"{len(names)} class names for {self.num_classes} classes.")
            if len(set(names)) != len(names) or not all(n.strip() for n in names):
                raise ValueError("class names must be distinct and not blank.")
        self.class_names: tuple[str, ...] | None = names

    def label(self, text: str) -> int:
        """The class a user asks for by number (`"207"`) or, when the class names are
        known, by name (`"tench"`); a number always means the class of that id.

        **Raises:**

        `ConfigError` for a number out of range or an unknown name, saying what exists.
        """
        text = text.strip()
        last = self.num_classes - 1
        if text.isascii() and text.isdigit():
            if int(text) > last:
                raise ConfigError(f"class {text} is out of range: the model has "
                                  f"{self.num_classes} classes, 0 to {last}.")
            return int(text)
        if self.class_names is None:
            raise ConfigError(f"class {text!r} is not a number from 0 to {last}, and this "
                              "model's classes have no names.")
        if text in self.class_names:
            return self.class_names.index(text)
        close = difflib.get_close_matches(text, self.class_names, n=3)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise ConfigError(f"no class named {text!r}; give a name of the data's classes "
                          f"({_listing(self.class_names)}) or a number from 0 to {last}.{hint}")

    def describe(self, label: int) -> str:
        """A class for people: its id, and its name when known (`"3 tabby"`)."""
        names = self.class_names or ()
        return f"{label} {names[label]}" if label < len(names) else str(label)

    @property
    def vocab_size(self) -> int:
        return self.num_classes + 1  # the classes and the null id

    def _id(self, caption: str) -> int:
        text = caption.strip()
        if not text:
            return self.num_classes
        if not text.isdigit() or int(text) >= self.num_classes:
            raise ValueError(
                f"a class-label caption is a class number in [0, {self.num_classes}) or '' "
                f"(no class); got {caption!r}."
            )
        return int(text)

    def encode(self, captions: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        if max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {max_len}.")
        ids = np.full((len(captions), max_len), self.num_classes, np.int32)
        mask = np.zeros((len(captions), max_len), bool)
        for row, caption in enumerate(captions):
            ids[row, 0] = self._id(caption)
            mask[row, 0] = True
        return ids, mask

    def decode(self, ids: Sequence[int] | np.ndarray) -> str | list[str]:
        ids = np.asarray(ids)
        if ids.ndim == 2:
            return [typing.cast(str, self.decode(row)) for row in ids]
        first = int(ids.reshape(-1)[0]) if ids.size else self.num_classes
        return "" if first >= self.num_classes else str(first)

    def pieces(self, caption: str) -> list[str]:
        label = self._id(caption)
        return [] if label == self.num_classes else [str(label)]

    def to_bytes(self) -> bytes:
        record: dict[str, Any] = {"num_classes": self.num_classes}
        if self.class_names is not None:
            record["class_names"] = list(self.class_names)
        return json.dumps(record).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ClassLabelTokenizer":
        record = json.loads(data.decode())
        return cls(record["num_classes"], record.get("class_names"))


@typing.final
class ClassLabelEncoder(AbstractTextEncoder):
    """A learned embedding per class, and a learned "fake" embedding for no class (MAR's
    `class_emb` and `fake_latent`).

    Reads the ids of `ClassLabelTokenizer`: ids below `num_classes` are classes, the null
    id `num_classes` (the empty caption) is the fake embedding. Label dropout for guidance
    is `FluidModel`'s caption dropout (0.1 by default, MAR's `label_drop_prob`), which
    replaces a label by the empty caption, that is by the fake embedding, as MAR does.
    Outputs at padding positions are zero. With `fluid.backbones.MaskedAutoencoder`, the
    one real token fills every buffer slot, as MAR's class embedding does.

    **Arguments:**

    - `num_classes`: number of classes.
    - `dim`: width of the embeddings.
    - `vocab_size`: the caption tokenizer's, `num_classes + 1` (the builder fills it in;
      `None` skips the check).
    - `key`: initialisation key.
    """

    class_embed: Float[Array, "classes dim"]
    fake_embed: Float[Array, " dim"]
    num_classes: int = eqx.field(static=True)
    dim: int = eqx.field(static=True)
    trainable: bool = eqx.field(static=True, default=True)

    def __init__(
        self,
        num_classes: int,
        dim: int,
        vocab_size: int | None = None,
        *,
        key: Key,
    ):
        if vocab_size is not None and vocab_size != num_classes + 1:
            raise ValueError(
                f"class labels need a vocabulary of num_classes + 1 = {num_classes + 1} ids "
                f"(the classes and the null id), got vocab_size={vocab_size}; use "
                "ClassLabelTokenizer as the caption tokenizer."
            )
        k_class, k_fake = jr.split(key)
        self.num_classes = num_classes
        self.dim = dim
        self.trainable = True
        self.class_embed = embedding((num_classes, dim), key=k_class)
        self.fake_embed = embedding((dim,), key=k_fake)

    @property
    def vocab_size(self) -> int:
        return self.num_classes + 1

    @classmethod
    def caption_tokenizer(cls, kwargs: Mapping[str, Any]) -> AbstractCaptionTokenizer | None:
        return ClassLabelTokenizer(kwargs["num_classes"])

    def __call__(self, ids: TextIds, mask: TextMask) -> Float[Array, "ctx text_dim"]:
        table = jnp.concatenate([self.class_embed, self.fake_embed[None]])
        h = table[jnp.clip(ids, 0, self.num_classes)]
        return jnp.where(mask[:, None], h, jnp.zeros((), h.dtype))


def load_mar_class_labels(
    encoder: ClassLabelEncoder, state: StateDict, prefix: str = ""
) -> ClassLabelEncoder:
    """`encoder` with MAR's `class_emb.weight` and `fake_latent` from `state` (taken,
    so `state.finish()` can report what nothing loaded).

    **Raises:**

    `fluid._weights.WeightError` naming a missing or mis-shaped key.
    """
    table = state.take(prefix + "class_emb.weight", encoder.class_embed.shape)
    fake = state.take(prefix + "fake_latent", (1, encoder.dim))
    return eqx.tree_at(
        lambda e: (e.class_embed, e.fake_embed),
        encoder,
        (jnp.asarray(table, jnp.float32), jnp.asarray(fake[0], jnp.float32)),
    )
