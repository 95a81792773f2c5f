"""The interface of host-side caption tokenizers, their registry, and their files."""

import abc
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .._registry import Registry


class AbstractCaptionTokenizer(abc.ABC):
    """Captions to fixed-length ids with a mask, and back, on the host (NumPy, not JAX).

    The data pipeline, the builder (the empty caption of guidance), the cache (`to_bytes` is
    part of its key), sampling and run folders use a caption tokenizer only through these
    methods, so any class that implements them works. A text encoder that comes with its own
    vocabulary (a pretrained T5) brings its tokenizer through
    `AbstractTextEncoder.caption_tokenizer`; for run folders to read it back, register its
    class in `CAPTION_TOKENIZERS` (or the `fluid.caption_tokenizers` entry-point group).
    """

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special ids included; every id `encode` gives is below it."""

    @abc.abstractmethod
    def encode(self, captions: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize a batch of captions.

        **Arguments:**

        - `captions`: the captions; `""` is the unconditional (empty) caption, which must
          keep at least one real token.
        - `max_len`: length of every output row. Longer captions are truncated.

        **Returns:**

        `(ids, mask)`: int32 `[len(captions), max_len]` and bool `[len(captions), max_len]`,
        the mask `True` at real tokens and `False` at padding (real tokens first).
        """

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str | list[str]:
        """Captions back from ids: one row `[L]` gives a string, a batch `[B, L]` a list."""

    @abc.abstractmethod
    def pieces(self, caption: str) -> list[str]:
        """The pieces a caption splits into (without special tokens), for inspection."""

    @abc.abstractmethod
    def to_bytes(self) -> bytes:
        """The whole tokenizer as bytes, which `from_bytes` reads back."""

    @classmethod
    @abc.abstractmethod
    def from_bytes(cls, data: bytes) -> "AbstractCaptionTokenizer":
        """The tokenizer `to_bytes` gave `data` for."""

    def save(self, path: str | os.PathLike) -> None:
        """Write `to_bytes()` to `path` and, beside it, `<stem>.json` naming the class by its
        name in `CAPTION_TOKENIZERS`, from which `load_caption_tokenizer` reads it back."""
        path = Path(path)
        record = caption_tokenizer_record(path)
        name = CAPTION_TOKENIZERS.name_of(type(self))
        path.write_bytes(self.to_bytes())
        record.write_text(json.dumps({"caption_tokenizer": name}) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AbstractCaptionTokenizer":
        """Read a tokenizer of this class from a file (`save` writes one)."""
        return cls.from_bytes(Path(path).read_bytes())


CAPTION_TOKENIZERS: Registry = Registry(
    "caption tokenizer", AbstractCaptionTokenizer, "fluid.caption_tokenizers"
)


def caption_tokenizer_record(path: str | os.PathLike) -> Path:
    """Where `save` records the class of the tokenizer it writes to `path`."""
    path = Path(path)
    if path.suffix == ".json":
        raise ValueError(f"{path}: a caption tokenizer's file must not end in .json (its "
                         "record beside it does).")
    return path.with_suffix(".json")
