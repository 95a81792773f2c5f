"""Training batches from any random-access source, through a Grain pipeline.

The pipeline is a `grain.MapDataset`, so every stage is a pure function of an index:

    source -> shuffle (a new permutation each epoch) -> repeat -> flip -> shard -> resume
           -> to_iter_dataset (decoding threads) [-> mp_prefetch (worker processes)]

and `Loader` then skips bad records, batches and tokenizes in the training process. Because
skipping (the only many-to-one step) happens after the worker processes, the stream of records
this process sees is the same for any number of workers, and a position in it is one integer:
the loader's state is `{"position", "skipped", "bad", "stream"}`, plain JSON (`bad` lists the
source indices of the bad records met so far, `skipped` counts them, and `stream` says what
the position refers to), and resuming from it slices the `MapDataset` at `position`, which
reproduces exactly the batches an uninterrupted run gives from there.
"""

import json
import os
import typing
import warnings
from typing import Any, Protocol, runtime_checkable

import absl.flags
import grain
import jax
import numpy as np

from .._errors import UserError
from ..config import ON_CHANGE
from ..text import CaptionTokenizer
from ._files import BadRecord, SkippedRecordWarning


@runtime_checkable
class RandomAccessSource(Protocol):
    """What `Loader` reads: `len(source)` items, `source[i]` a dict with `image` (float
    `[h, w, 3]` in [-1, 1]) and `caption` (str), raising `BadRecord` for an unusable one."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


_ARRAYS = ("image", "tokens", "posterior", "text_hidden")
# A folder: every `Loader` then appends the source indices of each batch it yields to
# `<folder>/shard<k>.jsonl`, to check which process read what (tests/test_multihost.py).
DATA_LOG_ENV = "FLUID_DATA_LOG"




class DataStreamChangedError(UserError, ValueError):
    """A saved loader state is from a different data stream than the loader's: another
    number of records, seed, shuffle, flip, epoch count or shard. Its position would name
    other records, so resuming from it would not continue the saved run's order. The message
    says what changed and what to do."""


class _Records:
    """The source as Grain reads it: `caption` and the arrays among `image`, `tokens` or
    `posterior` (a token cache's records) and `text_hidden` (dropping other keys keeps what
    crosses process boundaries small) with its source `index`, and a bad record as
    `{"skip": message, "index": index}` so the training process can warn and count each once
    (workers' warnings and counters would be lost)."""

    def __init__(self, source: Any):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            item = self.source[index]
        except BadRecord as error:
            return {"skip": str(error), "index": index}
        record = {k: np.asarray(item[k]) for k in _ARRAYS if k in item}
        if "image" in record:
            record["image"] = record["image"].astype(np.float32, copy=False)
        record["caption"] = item["caption"]
        record["index"] = index
        return record


class _Flip:
    """Mirror left-right with probability 1/2, decided by `(seed, stream position)` alone."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, position: int, record: dict[str, Any]) -> dict[str, Any]:
        # A fixed tag keeps the flip draws independent of the shuffle, which uses `seed` bare.
        flip = np.random.default_rng((self.seed, 0x0F11B, position)).random() < 0.5
        if flip and "image" in record:
            record = {**record, "image": np.ascontiguousarray(record["image"][:, ::-1])}
        return record


class _Share:
    """Process `index`'s share of `records` among `count` processes reading `size` records per
    batch: the `index`-th block of `size` records out of every `count * size`, so the
    processes' batches stacked in process order are the batches of one process reading
    `count * size` records at a time."""

    def __init__(self, records: Any, size: int, index: int, count: int):
        self.records, self.size, self.index, self.count = records, size, index, count

    def __len__(self) -> int:
        rounds, rest = divmod(len(self.records), self.count * self.size)
        return rounds * self.size + min(max(rest - self.index * self.size, 0), self.size)

    def __getitem__(self, position: int) -> Any:
        block, offset = divmod(position, self.size)
        return self.records[(block * self.count + self.index) * self.size + offset]


@typing.final
class Loader:
    """Batches of images and tokenized captions from a random-access source, via Grain.

    Each epoch visits the source in a fresh seeded order; this process reads the
    `shard_index`-th block of `batch_size` records out of every `shard_count * batch_size`
    of that order, so processes see disjoint shares that together cover each epoch, and
    their batches stacked in process order are the batches one process reading
    `shard_count * batch_size` at a time gets (while no record is skipped): a run over
    several hosts trains on the global batches a run on one host trains on. A record whose `source[i]` raises
    `BadRecord` is skipped; the next records fill the batch, so every batch is full. Each bad
    record is warned about once (a `SkippedRecordWarning` naming its file, the first time it
    is met) and counted once in `skipped`, however many epochs read it, and a resumed loader
    remembers the ones met before. Iteration ends after `num_epochs` (the last, partial batch
    dropped) or never when `num_epochs` is `None`.

    The batches depend only on the source, `seed`, `shuffle`, `flip`, `batch_size` and the
    shard, never on `workers` or `read_threads`. Resuming: save `get_state()` (a JSON-ready
    dict) with the checkpoint, and pass it back as `state` (or to `set_state`); the loader
    then yields exactly the batches the uninterrupted run yields after that point. A state
    from a different stream (the source has more or fewer records, or another seed, shuffle,
    flip, epoch count or shard) raises `DataStreamChangedError`, or with
    `on_change="restart"` starts this loader's stream from its beginning.

    **Arguments:**

    - `source`: `len(source)` items; `source[i]` a dict with `image` (float `[h, w, 3]` in
      [-1, 1], one size for all) and `caption` (str). `FolderSource`, `JsonlSource` and
      `ShapesDataset` are such sources.
    - `batch_size`: records per batch in this process.
    - `text_tokenizer`: turns captions into ids; `None` reads no captions (batches without
      `text_ids` and `text_mask`, for training an image tokenizer).
    - `text_len`: length of every id row (captions are padded or truncated to it).
    - `seed`: seed of the order and of the flips, in `[0, 2**32)`.
    - `shuffle`: visit records in a seeded random order, reshuffled every epoch; `False`
      reads them in index order (batch `k` of shard `p` of `n` is items
      `[(k * n + p) * batch_size, (k * n + p + 1) * batch_size)` when nothing is skipped;
      of a single process, `[k * batch_size, (k + 1) * batch_size)`, like `Batches`).
    - `flip`: mirror each image left-right with probability 1/2, a seeded decision per
      position. Off by default: a mirror contradicts captions that say "left of".
    - `num_epochs`: passes over the source; `None` repeats forever.
    - `workers`: processes decoding images (Grain's `mp_prefetch`); 0 decodes in this one.
    - `read_threads`: threads decoding images within each process.
    - `shard_index`, `shard_count`: this process's share; default `jax.process_index()` and
      `jax.process_count()`. With a finite `num_epochs`, shares may differ by a batch: train
      for a fixed number of steps rather than to the end of a share.
    - `state`: a `get_state()` to resume from; `None` starts at the beginning.
    - `on_change`: what a `state` (here or in `set_state`) from a different stream does:
      `"error"` raises `DataStreamChangedError`; `"restart"` accepts it with one `UserWarning`
      and starts at position 0 of this loader's stream, with no bad records known, to go on
      training a model on changed data.

    Batches are dicts: `image` float32 `[batch_size, h, w, 3]`, `text_ids` int32
    `[batch_size, text_len]`, `text_mask` bool `[batch_size, text_len]`; from a token cache
    (`CachedSource`), `tokens` (and `text_hidden`) in place of `image`.
    """

    def __init__(
        self,
        source: RandomAccessSource,
        *,
        batch_size: int,
        text_tokenizer: CaptionTokenizer | None,
        text_len: int,
        seed: int = 0,
        shuffle: bool = True,
        flip: bool = False,
        num_epochs: int | None = None,
        workers: int = 0,
        read_threads: int = 16,
        shard_index: int | None = None,
        shard_count: int | None = None,
        state: dict[str, Any] | None = None,
        on_change: str = "error",
    ):
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
        if batch_size < 1 or text_len < 2 or workers < 0 or read_threads < 1:
            raise ValueError(
                "need batch_size >= 1, text_len >= 2, workers >= 0 and read_threads >= 1; got "
                f"{batch_size=}, {text_len=}, {workers=}, {read_threads=}."
            )
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must lie in [0, 2**32) (Grain's range), got {seed}.")
        if not 0 <= shard_index < shard_count:
            raise ValueError(
                f"need 0 <= shard_index < shard_count, got {shard_index}/{shard_count}."
            )
        self.on_change = _check_on_change(on_change)
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be positive or None, got {num_epochs}.")
        length = len(source)
        if length == 0:
            raise ValueError("the source is empty: there is nothing to load.")
        if shuffle and length >= 2**32:
            raise ValueError(
                f"Grain's shuffle permutes at most 2**32 items; this source has {length}. "
                "Pass shuffle=False (and order the source yourself)."
            )
        self.batch_size = batch_size
        self.text_tokenizer = text_tokenizer
        self.text_len = text_len
        self.workers = workers
        self.read_threads = read_threads
        # What a saved position means; resuming a different stream would silently differ.
        self._stream = {
            "length": length,
            "seed": seed,
            "shuffle": shuffle,
            "flip": flip,
            "num_epochs": num_epochs,
            "shard_index": shard_index,
            "shard_count": shard_count,
        }
        records = grain.MapDataset.source(_Records(source))
        if shuffle:
            # Grain permutes lazily (an index bijection, reseeded per epoch), so even the
            # unbounded shapes set (2**31 - 1 items) is shuffled without being listed.
            records = records.shuffle(seed=seed)
        records = records.repeat(num_epochs)
        if flip:
            records = records.map_with_index(_Flip(seed))
        self._records = grain.MapDataset.source(
            _Share(records, batch_size, shard_index, shard_count)
        )
        # A whole epoch of this share skipped means nothing will ever load: fail, not spin.
        self._max_consecutive_skips = -(-length // shard_count)
        self._elements: grain.DatasetIterator | None = None
        self.position = 0
        # Source indices of the bad records met so far: each is warned about and counted once.
        self._bad: set[int] = set()
        if state is not None:
            self.set_state(state)

    @property
    def skipped(self) -> int:
        """How many distinct bad records this loader's stream has met (each counted once)."""
        return len(self._bad)

    def get_state(self) -> dict[str, Any]:
        """Where the loader is: `position` (records of this process's stream consumed),
        `bad` (the sorted source indices of the bad records met so far), `skipped` (how many
        those are) and `stream` (what the position refers to). Plain JSON values, to be saved
        with a checkpoint."""
        return {
            "position": self.position,
            "skipped": self.skipped,
            "bad": sorted(self._bad),
            "stream": dict(self._stream),
        }

    def set_state(self, state: dict[str, Any], *, on_change: str | None = None) -> None:
        """Continue from a `get_state()`.

        A state taken from a loader with a different stream (source length, seed, shuffle,
        flip, epochs or shard), whose position would name other records, raises
        `DataStreamChangedError` saying what changed, or under `on_change="restart"` is
        accepted with one `UserWarning`: the loader then starts at position 0 of its own
        stream, with no bad records known. A state saved before bad records were listed
        (without `bad`) resumes with none known.

        **Arguments:**

        - `state`: a `get_state()`, possibly through JSON.
        - `on_change`: `"error"` or `"restart"`; `None` uses the loader's `on_change`.
        """
        on_change = self.on_change if on_change is None else _check_on_change(on_change)
        saved = json.loads(json.dumps(state["stream"]))
        changed = saved != self._stream
        if changed and on_change == "error":
            raise DataStreamChangedError(
                "The loader state in the checkpoint is from a different data stream: "
                f"{_stream_changes(saved, self._stream)}. Its position would name other "
                "records, so training cannot resume where it stopped. Start a new run in "
                "another output directory, or set data.on_change=restart (on_change='restart' "
                "for a Loader) to continue training this model on the current data from the "
                "start of its order."
            )
        self.close()
        if changed:
            warnings.warn(
                "The data stream changed since the checkpoint was saved "
                f"({_stream_changes(saved, self._stream)}); as on_change='restart' asks, "
                "reading the current data from the start of its order, with skipped records "
                "counted afresh.",
                UserWarning,
                stacklevel=2,
            )
            self.position = 0
            self._bad = set()
            return
        self.position = int(state["position"])
        self._bad = {int(index) for index in state.get("bad", ())}

    def _iterator(self) -> grain.DatasetIterator:
        records = self._records[self.position :]
        options = grain.ReadOptions(
            num_threads=self.read_threads,
            prefetch_buffer_size=max(2 * self.batch_size, self.read_threads),
        )
        elements = records.to_iter_dataset(options)
        if self.workers > 0:
            # Grain 0.2.18 reads an absl flag when starting workers with JAX imported, and
            # fails unless flags count as parsed (google/grain#1355, fixed after 0.2.18); a
            # script that parses its own flags later still can.
            if not absl.flags.FLAGS.is_parsed():
                absl.flags.FLAGS.mark_as_parsed()
            elements = elements.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self.workers, per_worker_buffer_size=self.batch_size
                )
            )
        return iter(elements)

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._elements is None:
            self._elements = self._iterator()
        records, captions = [], []
        bad: set[int] = set()  # met for the first time in this batch
        consumed, run = 0, 0
        while len(records) < self.batch_size:
            record = next(self._elements)  # StopIteration ends the loader, dropping a partial batch
            consumed += 1
            if "skip" in record:
                run += 1
                index = int(record["index"])
                if index not in self._bad and index not in bad:
                    bad.add(index)
                    warnings.warn(f"skipped {record['skip']}", SkippedRecordWarning, stacklevel=2)
                if run >= self._max_consecutive_skips:
                    raise RuntimeError(
                        f"{run} records in a row were unusable (the last: {record['skip']}); "
                        "no record of the source loads."
                    )
                continue
            run = 0
            records.append(record)
            captions.append(record["caption"])
        text = {}
        if self.text_tokenizer is not None:
            ids, mask = self.text_tokenizer.encode(captions, self.text_len)
            text = {"text_ids": ids, "text_mask": mask}
        # The position only moves by whole batches, so a saved state is always a boundary;
        # the bad records met move with it, so the state lists exactly those before it.
        if log := os.environ.get(DATA_LOG_ENV):
            line = {"shard": self._stream["shard_index"], "shards": self._stream["shard_count"],
                    "position": self.position, "indices": [int(r["index"]) for r in records]}
            with open(os.path.join(log, f"shard{line['shard']}.jsonl"), "a") as f:
                f.write(json.dumps(line) + "\n")
        self.position += consumed
        self._bad |= bad
        batch = {k: np.stack([r[k] for r in records]) for k in _ARRAYS if k in records[0]}
        return {**batch, **text}

    def close(self) -> None:
        """Stop decoding threads and worker processes; iteration can continue afterwards
        (from the current position) and restarts them."""
        elements, self._elements = self._elements, None
        if elements is not None:
            elements.close()

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _check_on_change(on_change: str) -> str:
    if on_change not in ON_CHANGE:
        choices = " or ".join(repr(c) for c in ON_CHANGE)
        raise ValueError(f"on_change must be {choices}, got {on_change!r}.")
    return on_change


def _stream_changes(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """What differs between a saved stream and the current one, in words."""
    changes = []
    if saved.get("length") != now["length"]:
        changes.append(
            f"the data source has {now['length']} records now and had {saved.get('length')} "
            "when the checkpoint was saved"
        )
    if saved.get("seed") != now["seed"]:
        changes.append(f"the seed is {now['seed']} now and was {saved.get('seed')}")
    for key in ("shuffle", "flip", "num_epochs"):
        if saved.get(key) != now[key]:
            changes.append(f"{key} is {now[key]} now and was {saved.get(key)}")
    shard = ("shard_index", "shard_count")
    if any(saved.get(key) != now[key] for key in shard):
        changes.append(
            f"this process reads shard {now['shard_index']} of {now['shard_count']} now and "
            f"read shard {saved.get('shard_index')} of {saved.get('shard_count')}"
        )
    # Keys of a state from another fluid version, which the cases above do not name.
    known = {"length", "seed", "shuffle", "flip", "num_epochs", *shard}
    changes += [
        f"{key} is {now.get(key)} now and was {saved.get(key)}"
        for key in sorted((saved.keys() | now.keys()) - known)
        if saved.get(key) != now.get(key)
    ]
    return "; ".join(changes)
