"""Host-side batches: images and tokenized captions, deterministic per step, prefetched."""

import queue
import threading
from collections.abc import Iterator

import numpy as np

from ..config import DataConfig
from ..data.shapes import ShapesDataset
from ..text import TextTokenizer, train_text_tokenizer


def make_dataset(config: DataConfig) -> ShapesDataset:
    """The training data set a `DataConfig` names."""
    kwargs = {"image_size": config.image_size, "seed": config.seed}
    if config.categories is not None:
        kwargs["categories"] = tuple(config.categories)
    return ShapesDataset(**kwargs)


def make_text_tokenizer(dataset: ShapesDataset, vocab_size: int, n: int = 4096) -> TextTokenizer:
    """A SentencePiece tokenizer trained on `n` captions of the data set."""
    return train_text_tokenizer(dataset.captions(n), vocab_size=vocab_size)


def fit_images(dataset: ShapesDataset, n: int) -> np.ndarray:
    """`n` images for fitting data-fitted tokenizers, from the far end of the index space."""
    offset = 1 << 30  # disjoint from the indices training batches read
    return np.stack([dataset[offset + i]["image"] for i in range(n)])


class Batches:
    """Batch `step` holds data-set items `[step * batch_size, (step + 1) * batch_size)`.

    Iteration starts at `start_step` and prefetches on a background thread, so resuming at a
    step reproduces the batches of an uninterrupted run.
    """

    def __init__(
        self,
        dataset: ShapesDataset,
        text_tokenizer: TextTokenizer,
        batch_size: int,
        text_len: int,
        start_step: int = 0,
        prefetch: int = 2,
    ):
        self.dataset = dataset
        self.text_tokenizer = text_tokenizer
        self.batch_size = batch_size
        self.text_len = text_len
        self.start_step = start_step
        self.prefetch = prefetch

    def batch(self, step: int) -> dict[str, np.ndarray]:
        first = step * self.batch_size
        items = [self.dataset[first + i] for i in range(self.batch_size)]
        ids, mask = self.text_tokenizer.encode([it["caption"] for it in items], self.text_len)
        return {
            "image": np.stack([it["image"] for it in items]).astype(np.float32),
            "text_ids": ids,
            "text_mask": mask,
        }

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work():
            step = self.start_step
            while not stop.is_set():
                try:
                    item = self.batch(step)
                except BaseException as e:  # surface worker errors in the consumer
                    q.put(e)
                    return
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                step += 1

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
