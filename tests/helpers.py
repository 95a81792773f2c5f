"""Helpers shared by several test files."""

import io
from pathlib import Path

import equinox as eqx
import jax
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
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


def perturbed(module, key, scale=0.3):
    """`module` with every float leaf moved off its initial value (zero-initialised gates
    would otherwise block gradients to the layers before them, and make outputs trivial)."""
    leaves, treedef = jtu.tree_flatten(module)
    keys = jr.split(key, len(leaves))
    out = [
        x + scale * jr.normal(k, x.shape, x.dtype) if eqx.is_inexact_array(x) else x
        for x, k in zip(leaves, keys)
    ]
    return jtu.tree_unflatten(treedef, out)


def arrays(tree):
    """The array leaves of `tree` (`None` elsewhere), to compare two models' weights."""
    return eqx.filter(tree, eqx.is_array)


def trainer_params(trainer):
    """A trainer's trainable parameters, on the host."""
    return jax.device_get(eqx.filter(trainer.trainer.state.params, eqx.is_array))


def losses(history) -> np.ndarray:
    """The losses of a trainer's history (what `Trainer.run` returns)."""
    return np.array([r["loss"] for r in history])


def flip_middle(f: Path, count: int = 64) -> None:
    """Invert `count` bytes in the middle of `f`, keeping its size."""
    data = bytearray(f.read_bytes())
    start = len(data) // 2 - count // 2
    data[start : start + count] = bytes(b ^ 0xFF for b in data[start : start + count])
    f.write_bytes(bytes(data))
