"""Helpers shared by several test files."""

import io
from pathlib import Path

import jax.random as jr
import sentencepiece as spm


def write_tiny_t5_folder(folder: Path) -> Path:
    """A Hugging Face-format T5 encoder folder of random weights (vocabulary 120) with a
    SentencePiece `spiece.model` trained on shapes captions, as `t5` specs read it."""
    from test_t5 import TINY, hf_tensors, write_folder

    from fluid.data.shapes import caption_corpus
    from fluid.text import T5TextEncoder

    t5 = T5TextEncoder(**{**TINY, "vocab_size": 120}, feed_forward_proj="gated-gelu",
                       key=jr.key(1))
    write_folder(folder, hf_tensors(t5), vocab_size=120)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(caption_corpus(2000)), model_writer=proto, vocab_size=100,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        num_threads=1, minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(proto.getvalue())
    return folder
