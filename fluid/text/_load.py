"""Reading back a saved caption tokenizer, as the class recorded beside it."""

import json
import os

import sentencepiece as spm

from ._caption_tokenizer import (
    CAPTION_TOKENIZERS,
    AbstractCaptionTokenizer,
    caption_tokenizer_record,
)
from ._sentencepiece import TextTokenizer
from ._t5_tokenizer import T5CaptionTokenizer


def load_caption_tokenizer(path: str | os.PathLike) -> AbstractCaptionTokenizer:
    """The caption tokenizer `AbstractCaptionTokenizer.save` wrote to `path`, as the class
    its record (`<stem>.json` beside it) names in `CAPTION_TOKENIZERS`.

    A file without a record (run folders written before fluid kept one) is a SentencePiece
    model read by its special ids: `TextTokenizer` for fluid's own (BOS id 1),
    `T5CaptionTokenizer` for a T5 `spiece.model` (no BOS, EOS id 1).
    """
    record = caption_tokenizer_record(path)
    if record.exists():
        name = json.loads(record.read_text())["caption_tokenizer"]
        return CAPTION_TOKENIZERS.get(name).load(path)
    with open(path, "rb") as f:
        proto = f.read()
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto)
    if processor.bos_id() < 0 and processor.eos_id() == 1:
        return T5CaptionTokenizer(proto)
    return TextTokenizer(proto)
