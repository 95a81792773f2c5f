"""Reading back a saved caption tokenizer, whichever convention its model file follows."""

import os

import sentencepiece as spm

from ._sentencepiece import TextTokenizer
from ._t5_tokenizer import T5CaptionTokenizer

# Anything that turns captions into fixed-length ids and a mask on the host: fluid's own
# SentencePiece tokenizer, or a pretrained T5's.
CaptionTokenizer = TextTokenizer | T5CaptionTokenizer


def load_caption_tokenizer(path: str | os.PathLike) -> CaptionTokenizer:
    """The caption tokenizer of a SentencePiece model file: `TextTokenizer` for fluid's own
    (BOS id 1), `T5CaptionTokenizer` for a T5 `spiece.model` (no BOS, EOS id 1)."""
    with open(path, "rb") as f:
        proto = f.read()
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto)
    if processor.bos_id() < 0 and processor.eos_id() == 1:
        return T5CaptionTokenizer(proto)
    return TextTokenizer(proto)
