"""The trainer's data: the source a `DataConfig` names, its caption tokenizer, its loader."""

import warnings
from typing import Any

import numpy as np

from .._errors import ConfigError
from ..config import DataConfig, ModelConfig
from ..data import BadRecord, FolderSource, ImageFolderSource, JsonlSource, Loader
from ..data.shapes import DEMO_PROMPTS, ShapesDataset, shapes_options
from ..text import (
    TEXT_ENCODERS,
    CaptionTokenizer,
    ClassLabelTokenizer,
    TextTokenizer,
    train_text_tokenizer,
)

# Data-fitted parts (the palette codebook) see images from the far end of the built-in data
# set's index space, disjoint from what training reads.
_FIT_OFFSET = 1 << 30


def make_source(config: DataConfig) -> Any:
    """The random-access source of images and captions a `DataConfig` names."""
    if config.dataset == "folder":
        return FolderSource(config.path, config.image_size)
    if config.dataset == "jsonl":
        return JsonlSource(config.path, config.image_size)
    if config.dataset == "imagefolder":
        return ImageFolderSource(config.path, config.image_size)
    return ShapesDataset(config.image_size, seed=config.seed, size=config.size,
                         **shapes_options(config))


def source_captions(source: Any, n: int) -> list[str]:
    """Up to `n` captions of a source, read without decoding its images."""
    if isinstance(source, ShapesDataset):
        return source.captions(min(n, len(source)))
    out = []
    for i in range(min(n, len(source))):
        try:
            out.append(source.caption(i))
        except BadRecord:
            continue
    return out


def caption_tokenizer(source: Any, model: ModelConfig) -> CaptionTokenizer:
    """The caption tokenizer `model` needs: the one its text encoder comes with
    (`AbstractTextEncoder.caption_tokenizer`: a pretrained T5's `spiece.model`), or else one
    trained on the source's captions (`make_text_tokenizer`)."""
    spec = model.text_encoder
    own = TEXT_ENCODERS.get(spec.name).caption_tokenizer(spec.kwargs)
    if isinstance(own, ClassLabelTokenizer) and isinstance(source, ImageFolderSource):
        # The data's class names travel with the run's tokenizer (`fluid sample --class`).
        if len(source.classes) > own.num_classes:
            raise ConfigError(
                f"the data has {len(source.classes)} classes (folders of {source.root}), the "
                f"class_labels text encoder {own.num_classes}: set "
                f"model.text_encoder.kwargs.num_classes={len(source.classes)}."
            )
        return ClassLabelTokenizer(own.num_classes, source.classes)
    return make_text_tokenizer(source, model.text_vocab_size) if own is None else own


def demo_prompts(text_tokenizer: CaptionTokenizer | None) -> list[str]:
    """What a run's sample grids show: the first eight classes of a class-conditional
    model, else the built-in data's demo captions."""
    if isinstance(text_tokenizer, ClassLabelTokenizer):
        return [str(i) for i in range(min(8, text_tokenizer.num_classes))]
    return list(DEMO_PROMPTS)


def grid_captions(text_tokenizer: CaptionTokenizer | None, prompts: list[str]) -> list[str]:
    """The captions shown under a grid's images: a class-conditional model's classes with
    their names when known (`"3 tabby"`, `"no class"`), else the prompts."""
    if not isinstance(text_tokenizer, ClassLabelTokenizer):
        return list(prompts)
    return [text_tokenizer.describe(int(p)) if p.strip() else "no class" for p in prompts]


def make_text_tokenizer(source: Any, vocab_size: int, n: int = 4096) -> TextTokenizer:
    """A SentencePiece tokenizer trained on up to `n` captions of the source."""
    captions = source_captions(source, n)
    if not captions:
        raise ValueError("the data source has no non-empty captions to train a tokenizer on.")
    return train_text_tokenizer(captions, vocab_size=vocab_size)


def fit_images(source: Any, n: int) -> np.ndarray:
    """`n` images for fitting data-fitted tokenizers.

    From the unbounded built-in data set: items far from those training reads. From a
    user's files or a finite set: the first `n` that decode (unreadable ones are skipped), cycling if there are fewer.
    """
    if isinstance(source, ShapesDataset) and source.size is None:
        return np.stack([source[_FIT_OFFSET + i]["image"] for i in range(n)])
    images = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(min(len(source), 4 * n)):
            try:
                images.append(source[i]["image"])
            except BadRecord:
                continue
            if len(images) == n:
                break
    if not images:
        raise ValueError("no image of the data source could be read to fit the tokenizer.")
    return np.stack([images[i % len(images)] for i in range(n)])


def make_loader(
    source: Any,
    config: DataConfig,
    *,
    text_tokenizer: CaptionTokenizer | None,
    batch_size: int,
    text_len: int,
    state: dict[str, Any] | None = None,
) -> Loader:
    """The training loader: this process's share of each global batch, resumable (without
    captions when `text_tokenizer` is `None`)."""
    import jax

    if batch_size % jax.process_count():
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the {jax.process_count()} processes."
        )
    return Loader(
        source,
        batch_size=batch_size // jax.process_count(),
        text_tokenizer=text_tokenizer,
        text_len=text_len,
        seed=config.seed,
        shuffle=config.shuffle,
        flip=config.flip,
        workers=config.workers,
        on_change=config.on_change,
        state=state,
    )
