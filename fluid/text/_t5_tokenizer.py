"""The host-side caption tokenizer of a pretrained T5: its own `spiece.model`."""

import os
import typing
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm

from ._caption_tokenizer import AbstractCaptionTokenizer
from ._sentencepiece import _check_caption

T5_PAD_ID, T5_EOS_ID, T5_UNK_ID = 0, 1, 2


@typing.final
class T5CaptionTokenizer(AbstractCaptionTokenizer):
    """Captions to T5's ids with a mask, on the host (NumPy, not JAX).

    T5's conventions, as `transformers.T5Tokenizer` applies them: no BOS; every caption
    becomes `pieces..., EOS` (EOS is id 1), padded with id 0. The empty caption becomes
    `EOS` alone, the unconditional input of classifier-free guidance. An
    `AbstractCaptionTokenizer`, as `TextTokenizer` is, so the data pipeline, the builder and
    sampling take either.

    T5's sentinel ids (`<extra_id_N>`, appended after the pieces for its pre-training) never
    arise from captions, and text that spells a special token (`"</s>"`) is split into
    ordinary pieces rather than read as that token.

    **Arguments:**

    - `proto`: a serialised SentencePiece model whose special ids are pad 0, eos 1, unk 2,
      as every T5 `spiece.model` has them.
    """

    pad_id: int = T5_PAD_ID
    eos_id: int = T5_EOS_ID
    unk_id: int = T5_UNK_ID

    def __init__(self, proto: bytes):
        processor = spm.SentencePieceProcessor()
        processor.LoadFromSerializedProto(proto)
        found = (processor.pad_id(), processor.eos_id(), processor.unk_id())
        if found != (T5_PAD_ID, T5_EOS_ID, T5_UNK_ID):
            raise ValueError(
                "a T5 SentencePiece model uses pad_id=0, eos_id=1, unk_id=2; this one uses "
                f"pad_id={found[0]}, eos_id={found[1]}, unk_id={found[2]}."
            )
        self._proto = bytes(proto)
        self._processor = processor

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "T5CaptionTokenizer":
        """The tokenizer of a Hugging Face T5 folder (its `spiece.model`), or of a
        `.model` file given directly."""
        path = os.fspath(folder)
        if os.path.isdir(path):
            path = os.path.join(path, "spiece.model")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path}: no SentencePiece model; a T5 folder holds spiece.model (a "
                "tokenizer.json alone is not read)."
            )
        return cls.load(path)

    @classmethod
    def from_bytes(cls, proto: bytes) -> "T5CaptionTokenizer":
        """The tokenizer of a serialised SentencePiece model (as `to_bytes` returns)."""
        return cls(proto)

    def to_bytes(self) -> bytes:
        """The serialised SentencePiece model (what `save` writes: a `spiece.model`)."""
        return self._proto

    @property
    def vocab_size(self) -> int:
        """Number of pieces, special ids included; every id `encode` gives is below it."""
        return self._processor.get_piece_size()

    def pieces(self, caption: str) -> list[str]:
        """The pieces a caption splits into (without EOS), for inspection."""
        return self._processor.encode(_check_caption(caption, 0), out_type=str)

    def encode(self, captions: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize a batch of captions.

        **Arguments:**

        - `captions`: the captions; `""` is the unconditional (empty) caption.
        - `max_len`: length of every output row, at least 1 (Fluid used 128). Longer
          captions are truncated, keeping `EOS` as the last token.

        **Returns:**

        `(ids, mask)`: int32 `[len(captions), max_len]` and bool `[len(captions), max_len]`,
        the mask `True` at real tokens (pieces and `EOS`) and `False` at padding.
        """
        if isinstance(captions, str):
            raise TypeError("encode takes a sequence of captions; wrap a single caption in a list.")
        if max_len < 1:
            raise ValueError(f"max_len must be at least 1 (room for EOS), got {max_len}.")
        captions = [_check_caption(c, i) for i, c in enumerate(captions)]
        ids = np.full((len(captions), max_len), T5_PAD_ID, np.int32)
        mask = np.zeros((len(captions), max_len), bool)
        for row, pieces in enumerate(self._processor.encode(captions) if captions else []):
            tokens = [*pieces[: max_len - 1], T5_EOS_ID]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = True
        return ids, mask

    def decode(self, ids: Sequence[int] | np.ndarray) -> str | list[str]:
        """Captions back from ids: one row gives a string, a batch a list of strings.

        Padding and everything from `EOS` on are dropped.
        """
        ids = np.asarray(ids)
        if ids.ndim == 2:
            return [self.decode(row) for row in ids]
        if ids.ndim != 1:
            raise ValueError(f"decode takes ids of shape [L] or [B, L], got shape {ids.shape}.")
        out = []
        for i in ids.tolist():
            if i == T5_EOS_ID:
                break
            if i != T5_PAD_ID:
                out.append(i)
        return self._processor.decode(out)
