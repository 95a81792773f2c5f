"""Requests of several clients sampled together: a queue and one worker thread."""

import dataclasses
import threading
import time
import traceback

import jax.numpy as jnp
import jax.random as jr
import numpy as np

from .._errors import UserError
from .._types import Keys
from ..pipeline import Pipeline
from ..sample import sample_images_per_key


@dataclasses.dataclass(frozen=True)
class Settings:
    """What must be equal for requests to share one compiled call (each is static in
    `FluidModel.generate`)."""

    steps: int
    cfg: float
    cfg_schedule: str
    temperature: float


class ServerClosed(RuntimeError):
    """The server stopped before the job was sampled."""


@dataclasses.dataclass(eq=False)
class Job:
    """One request: `num_images` images of `prompt` (as the model reads it) drawn from
    `seed`; `images` (`[num_images, h, w, 3]` in [-1, 1]) or `error` once `done` is set.
    `negative_prompt`, as the model reads it, is what guidance steers away from (`""`:
    none)."""

    prompt: str
    negative_prompt: str
    seed: int
    num_images: int
    settings: Settings
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    images: np.ndarray | None = None
    error: Exception | None = None


def image_keys(seed: int, count: int) -> Keys:
    """The keys of a request's images: `jr.key(seed)` for the first, `fold_in(key(seed), j)`
    for image `j > 0`; so its images are those of `Pipeline(prompt,
    num_images_per_prompt=count, seed=seed, batch_size=1)`, and the first is what
    `fluid sample --seed` draws for the prompt alone."""
    key = jr.key(seed)
    return jnp.stack([key] + [jr.fold_in(key, j) for j in range(1, count)])


class Batcher:
    """Samples queued jobs on one worker thread, several jobs per call.

    The worker takes the oldest job and, from the jobs queued behind it with the same
    `Settings`, as many as fit in `batch_size` images, oldest first; it waits up to
    `max_wait` seconds for more to arrive while the batch is not full. Every call samples
    exactly `batch_size` images (the unused rows repeat the last image and are dropped), so
    each `Settings` compiles one program. A job's images depend on its prompt, seed and
    settings alone (`image_keys`, `fluid.sample.sample_images_per_key`), not on the jobs it
    was batched with.

    **Arguments:**

    - `pipeline`: the model, its caption tokenizer and its config.
    - `batch_size`: images per call; a job may ask for at most this many.
    - `max_wait`: seconds the oldest job waits for others to join it.
    """

    def __init__(self, pipeline: Pipeline, *, batch_size: int, max_wait: float = 0.0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self.pipeline = pipeline
        self.batch_size = batch_size
        self.max_wait = max_wait
        self.calls = 0  # sampling calls made, for logs and tests
        self._queue: list[Job] = []
        self._closed = False
        self._changed = threading.Condition()
        self._worker = threading.Thread(target=self._work, name="fluid-serve-batcher",
                                        daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> Job:
        """Queue `job` and wait until it is sampled (or refused); returns it."""
        if not 1 <= job.num_images <= self.batch_size:
            raise ValueError(f"a job asks for 1 to {self.batch_size} images, not "
                             f"{job.num_images}.")
        with self._changed:
            if self._closed:
                job.error = ServerClosed("the server is shutting down.")
                job.done.set()
                return job
            self._queue.append(job)
            self._changed.notify_all()
        job.done.wait()
        return job

    def pending(self) -> int:
        """Jobs queued and not yet taken by the worker."""
        with self._changed:
            return len(self._queue)

    def close(self) -> None:
        """Stop the worker after the call it is making; queued jobs are refused."""
        with self._changed:
            self._closed = True
            refused, self._queue = self._queue, []
            self._changed.notify_all()
        for job in refused:
            job.error = ServerClosed("the server is shutting down.")
            job.done.set()
        self._worker.join()

    def _fitting(self) -> list[Job]:
        """The oldest job and those behind it with its settings that fit in one batch."""
        first = self._queue[0]
        batch, images = [], 0
        for job in self._queue:
            if job.settings == first.settings and images + job.num_images <= self.batch_size:
                batch.append(job)
                images += job.num_images
        return batch

    def _take(self) -> list[Job]:
        with self._changed:
            while not self._queue and not self._closed:
                self._changed.wait()
            if self._closed:
                return []
            deadline = time.monotonic() + self.max_wait
            while not self._closed:
                batch = self._fitting()
                left = deadline - time.monotonic()
                if sum(j.num_images for j in batch) == self.batch_size or left <= 0:
                    break
                self._changed.wait(left)
            if self._closed:  # `close` refused the queued jobs
                return []
            batch = self._fitting()
            self._queue = [job for job in self._queue if job not in batch]
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            try:
                images = self._sample(batch)
                start = 0
                for job in batch:
                    job.images = images[start:start + job.num_images]
                    start += job.num_images
            except Exception as error:  # noqa: BLE001
                # A failed call fails its jobs, not the server.
                if not isinstance(error, UserError):
                    traceback.print_exc()
                for job in batch:
                    job.error = error
            finally:
                for job in batch:
                    job.done.set()

    def _sample(self, batch: list[Job]) -> np.ndarray:
        prompts = [job.prompt for job in batch for _ in range(job.num_images)]
        negatives = [job.negative_prompt for job in batch for _ in range(job.num_images)]
        keys = jnp.concatenate([image_keys(job.seed, job.num_images) for job in batch])
        padding = self.batch_size - len(prompts)
        prompts += [prompts[-1]] * padding
        negatives += [negatives[-1]] * padding
        keys = jnp.concatenate([keys, jnp.stack([keys[-1]] * padding)]) if padding else keys
        settings = batch[0].settings
        self.calls += 1
        images = sample_images_per_key(
            self.pipeline.model, self.pipeline.text_tokenizer, prompts, keys,
            text_len=self.pipeline.config.model.text_len, steps=settings.steps,
            cfg=settings.cfg, cfg_schedule=settings.cfg_schedule,
            temperature=settings.temperature,
            # The empty caption gives the images of no negative prompt (tested): a batch with
            # none at all skips them, and with guidance off they must be left out.
            negative_prompts=negatives if any(negatives) else None,
        )
        return images[: len(prompts) - padding]
