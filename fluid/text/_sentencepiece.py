"""The host-side caption tokenizer: SentencePiece, trained in memory on captions."""

import io
import typing
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from ._caption_tokenizer import AbstractCaptionTokenizer

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


@typing.final
class TextTokenizer(AbstractCaptionTokenizer):
    """Captions to fixed-length id arrays with a mask, on the host (NumPy, not JAX).

    Every caption becomes `BOS, pieces..., EOS`, padded with `PAD` (id 0). The empty caption
    becomes `BOS, EOS`: the unconditional input of classifier-free guidance, which therefore
    always has at least one real token to attend to.

    **Arguments:**

    - `proto`: a serialised SentencePiece model whose special ids are pad 0, bos 1, eos 2,
      unk 3 (as `train_text_tokenizer` makes them).
    """

    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    unk_id: int = UNK_ID

    def __init__(self, proto: bytes):
        processor = spm.SentencePieceProcessor()
        processor.LoadFromSerializedProto(proto)
        found = (processor.pad_id(), processor.bos_id(), processor.eos_id(), processor.unk_id())
        if found != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
            raise ValueError(
                "the SentencePiece model must use pad_id=0, bos_id=1, eos_id=2, unk_id=3; this "
                f"one uses {found}. Train it with `train_text_tokenizer`."
            )
        self._proto = bytes(proto)
        self._processor = processor

    @classmethod
    def from_bytes(cls, proto: bytes) -> "TextTokenizer":
        """The tokenizer of a serialised SentencePiece model (as `to_bytes` returns)."""
        return cls(proto)

    def to_bytes(self) -> bytes:
        """The serialised SentencePiece model (what `save` writes: a model file that
        SentencePiece itself reads too)."""
        return self._proto

    @property
    def vocab_size(self) -> int:
        """Number of ids, special ids included; every id lies in `[0, vocab_size)`."""
        return self._processor.get_piece_size()

    def pieces(self, caption: str) -> list[str]:
        """The pieces a caption splits into (without BOS and EOS), for inspection."""
        return self._processor.encode(_check_caption(caption, 0), out_type=str)

    def encode(self, captions: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize a batch of captions.

        **Arguments:**

        - `captions`: the captions; `""` is the unconditional (empty) caption.
        - `max_len`: length of every output row, at least 2. Longer captions are truncated,
          keeping `EOS` as the last token.

        **Returns:**

        `(ids, mask)`: int32 `[len(captions), max_len]` and bool `[len(captions), max_len]`,
        the mask `True` at real tokens (`BOS`, pieces, `EOS`) and `False` at padding.
        """
        if isinstance(captions, str):
            raise TypeError("encode takes a sequence of captions; wrap a single caption in a list.")
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2 (room for BOS and EOS), got {max_len}.")
        captions = [_check_caption(c, i) for i, c in enumerate(captions)]
        ids = np.full((len(captions), max_len), PAD_ID, np.int32)
        mask = np.zeros((len(captions), max_len), bool)
        for row, pieces in enumerate(self._processor.encode(captions) if captions else []):
            tokens = [BOS_ID, *pieces[: max_len - 2], EOS_ID]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = True
        return ids, mask

    def decode(self, ids: Sequence[int] | np.ndarray) -> str | list[str]:
        """Captions back from ids: one row gives a string, a batch a list of strings.

        Padding, `BOS` and everything from `EOS` on are dropped.
        """
        ids = np.asarray(ids)
        if ids.ndim == 2:
            return [self.decode(row) for row in ids]
        if ids.ndim != 1:
            raise ValueError(f"decode takes ids of shape [L] or [B, L], got shape {ids.shape}.")
        out = []
        for i in ids.tolist():
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                out.append(i)
        return self._processor.decode(out)


def _check_caption(caption, index: int) -> str:
    if not isinstance(caption, str):
        raise TypeError(
            f"captions must be str; caption {index} is {type(caption).__name__} ({caption!r})."
        )
    return caption


def train_text_tokenizer(
    captions: Iterable[str],
    vocab_size: int = 256,
    model_type: str = "word",
    character_coverage: float = 1.0,
) -> TextTokenizer:
    """Train a SentencePiece tokenizer in memory.

    **Arguments:**

    - `captions`: the training text, one caption per item.
    - `vocab_size`: the most ids the tokenizer may use, special ids (pad, bos, eos, unk)
      included. A corpus with fewer distinct pieces gets a smaller vocabulary rather than an
      error; `TextTokenizer.vocab_size` gives the size reached.
    - `model_type`: SentencePiece's `"word"`, `"unigram"`, `"bpe"` or `"char"`. Words suit
      a closed vocabulary such as the shapes captions (one id per word, unknown words map
      to unk); `"unigram"` or `"bpe"` suit open-vocabulary captions with a large
      `vocab_size`.
    - `character_coverage`: fraction of characters the vocabulary covers (1.0 for small,
      closed vocabularies such as the shapes captions).

    **Returns:**

    A `TextTokenizer`. Training is deterministic: the same captions give the same model.
    """
    captions = [_check_caption(c, i) for i, c in enumerate(captions)]
    captions = [c for c in captions if c.strip()]
    if not captions:
        raise ValueError("train_text_tokenizer needs at least one non-empty caption.")
    if vocab_size < 5:
        raise ValueError(
            f"vocab_size must be at least 5 (4 special ids and a piece), got {vocab_size}."
        )
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        pad_id=PAD_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        # Shapes captions have a few dozen words: let the vocabulary be smaller than asked.
        hard_vocab_limit=False,
        # Training sees every caption in corpus order: no sampling, no threads racing.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    return TextTokenizer(model.getvalue())
