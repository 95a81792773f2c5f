"""The one training loop of fluid: a jitted step over trainable parameters, AdamW, EMA."""

import functools
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from jax.typing import DTypeLike
from jaxtyping import Array, Int
from tqdm.auto import tqdm

from .._errors import TrainingDiverged
from .._types import Key
from ..config import TrainConfig, to_dict
from ..data import SkippedRecordWarning
from ..model import FluidModel
from ..run import CheckpointManager, MetricsLog, RunFolder, SummaryWriter, truncate_metrics
from ..text import CaptionTokenizer, load_caption_tokenizer
from ..tokenizers import AutoencoderObjective
from ._cache import cache_fingerprint, cached_source
from ._data import caption_tokenizer, fit_images, make_loader, make_source
from ._interrupt import DeferredInterrupt, TrainingInterrupted
from ._optim import ema_update, global_norm, make_optimizer, trainable_mask
from ._sharding import create_sharded, make_mesh, put_sharded, shard_batch, state_shardings
from ._tasks import get_task

# Held-out images of a tokenizer run's PSNR: a steady estimate for the cost of a forward
# pass over a few training batches.
EVAL_IMAGES = 64


class TrainState(eqx.Module):
    """Everything that changes during training; a pytree that goes in and out of the step."""

    params: Any  # trainable leaves of the model (None elsewhere)
    opt_state: Any
    ema: Any  # exponential moving average of `params`
    step: Int[Array, ""]
    key: Key


def resolve_precision(precision: str) -> jnp.dtype:
    """The backbone's compute dtype for a `TrainConfig.precision`.

    `"auto"` is bfloat16 on accelerators and float32 on CPU, where bfloat16 matmuls are
    emulated and measure slower (`benchmarks/throughput.py --precision`).
    """
    if precision == "auto":
        precision = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return jnp.dtype(precision)


def cast_backbone(model: FluidModel, dtype: DTypeLike) -> FluidModel:
    """`model` with the backbone's floating-point parameters in `dtype` (for its compute)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return model

    def cast(x):
        return x.astype(dtype) if eqx.is_inexact_array(x) else x

    return eqx.tree_at(lambda m: m.backbone, model, jax.tree.map(cast, model.backbone))


def _init_state(params, key: Key, *, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        ema=jax.tree.map(jnp.copy, params),
        step=jnp.zeros((), jnp.int32),
        key=key,
    )


def _micro_batches(tree, k: int):
    # Micro-batch j holds examples j, j + k, j + 2k, ...: each device's rows of the
    # data-sharded batch stay on that device, whatever k is.
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, k, *x.shape[1:]), 0, 1), tree)


def _train_step(state, frozen, batch, *, static, optimizer, ema_decay, grad_accum, dtype):
    # `dtype`: the backbone's compute dtype; None for a model without one (a tokenizer run).
    key, sub = jr.split(state.key)
    keys = jr.split(sub, jax.tree.leaves(batch)[0].shape[0])

    def sums(params, micro, micro_keys):
        model = eqx.combine(params, frozen, static)
        if dtype is not None:
            model = cast_backbone(model, dtype)
        total, count = model.loss_terms(micro, keys=micro_keys)
        return jnp.sum(total), jnp.sum(count)

    grad_fn = jax.value_and_grad(sums, has_aux=True)
    if grad_accum == 1:
        (total, count), grads = grad_fn(state.params, batch, keys)
    else:
        def accumulate(carry, micro):
            (t, c), g = grad_fn(state.params, *micro)
            g_sum, t_sum, c_sum = carry
            return (jax.tree.map(jnp.add, g_sum, g), t_sum + t, c_sum + c), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, total, count), _ = jax.lax.scan(
            accumulate, init, _micro_batches((batch, keys), grad_accum)
        )
    # The loss is a mean over every target position of the batch: divide the summed
    # gradients once, by the count over all micro-batches.
    count = jnp.maximum(count, 1.0)
    loss = total / count
    grads = jax.tree.map(lambda g: g / count, grads)
    # optax mixes Python floats with int32 step counts, which strict promotion refuses.
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = eqx.apply_updates(state.params, updates)
    ema = ema_update(state.ema, params, ema_decay)
    metrics = {"loss": loss, "grad_norm": global_norm(grads)}
    return TrainState(params, opt_state, ema, state.step + 1, key), metrics


class Trainer:
    """Builds a model from a `TrainConfig` and trains it, on one device or a mesh.

    The model is created already sharded by the rule set `config.mesh.rules` on a mesh of
    `config.mesh` axes; each step takes a global batch sharded over `"data"`, accumulates
    `config.grad_accum` micro-batches and updates the state in place (donated). With an
    `out_dir`, it resumes from the latest checkpoint there (`checkpoints/`) exactly where
    that run stopped, writes one every `checkpoint_every` steps, at the end and on
    interruption, and logs metrics to `metrics.jsonl` and TensorBoard.

    What the model is, how it is evaluated, pictured and saved depends on `config.task`
    (`fluid.train.TASKS`): `"generate"` trains a `FluidModel`; `"tokenizer"` an
    `AutoencoderObjective` over `config.model.tokenizer` (every floating-point leaf trained,
    no captions read, no backbone cast), logging the `psnr` of held-out reconstructions
    every `log_every` steps and saving the tokenizer as a diffusers folder.

    **Arguments:**

    - `config`: the run.
    - `out_dir`: where checkpoints, metrics, the config and the final model go; `None`
      writes nothing.
    - `progress`: show a progress bar.
    - `resume`: continue from the latest checkpoint in `out_dir` if there is one.
    - `devices`: the devices of the mesh; all by default.
    - `optimizer`: an optax transformation to use instead of the config's AdamW (the
      trainable mask and clipping are then up to it).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        out_dir: str | Path | None = None,
        progress: bool = True,
        resume: bool = True,
        devices: Sequence[jax.Device] | None = None,
        optimizer: optax.GradientTransformation | None = None,
    ):
        self.config = config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        # Every path under `out_dir` (`fluid.run.RunFolder`).
        self.folder = RunFolder(self.out_dir) if self.out_dir is not None else None
        # On several hosts every process computes, process 0 alone writes files and prints
        # (orbax coordinates the checkpoint writes itself).
        self.is_main = jax.process_index() == 0
        self.progress = progress and self.is_main
        self.mesh = make_mesh({"data": config.mesh.data, "model": config.mesh.model}, devices)
        self.source = make_source(config.data)
        self.checkpoints = None
        if self.out_dir is not None:
            self.checkpoints = CheckpointManager(
                self.folder.checkpoints, keep=config.keep_checkpoints
            )
        resuming = resume and self.checkpoints is not None and (
            self.checkpoints.latest_step() is not None
        )
        self.task = get_task(config.task)
        self.text_tokenizer = (
            self._text_tokenizer(reuse=resuming) if self.task.reads_captions else None
        )
        # The backbone's compute dtype; None when nothing is cast (a tokenizer run).
        self.dtype = self.task.compute_dtype(config)
        rules, min_size = config.mesh.rules, config.mesh.min_shard_size

        k_model, k_train = jr.split(jr.key(config.seed))
        build = self.task.builder(
            config, source=self.source, text_tokenizer=self.text_tokenizer, key=k_model
        )
        if any("path" in spec.kwargs for spec in (config.model.tokenizer,
                                                   config.model.text_encoder)):
            # Pretrained weights read from files: under jit they would become constants of
            # the compiled program; build on the host, then place.
            model = put_sharded(build(), self.mesh, rules, min_size=min_size)
        else:
            model = create_sharded(build, self.mesh, rules, min_size=min_size)
        params, rest = eqx.partition(model, trainable_mask(model))
        self.frozen, self.static = eqx.partition(rest, eqx.is_array)
        self.optimizer = optimizer or make_optimizer(config.optim, config.steps)

        init = functools.partial(_init_state, optimizer=self.optimizer)
        abstract = eqx.filter_eval_shape(init, params, k_train)
        self.state_sharding = state_shardings(abstract, self.mesh, rules, min_size=min_size)
        self.state = jax.jit(init, out_shardings=self.state_sharding)(params, k_train)
        self.step_fn = jax.jit(
            functools.partial(
                _train_step,
                static=self.static,
                optimizer=self.optimizer,
                ema_decay=config.optim.ema_decay,
                grad_accum=config.grad_accum,
                dtype=self.dtype,
            ),
            out_shardings=(self.state_sharding, NamedSharding(self.mesh, PartitionSpec())),
            donate_argnums=(0,),
        )
        self.history: list[dict[str, float | int]] = []
        self._held_out: jax.Array | None = None

        data_state = self._restore() if resuming else None
        if config.data.cache:
            fingerprint = cache_fingerprint(
                self.model(), to_dict(config.data), self.text_tokenizer, config.model.text_len
            )
            self.source = cached_source(
                config.data.cache, self.source, self.model(), self.text_tokenizer,
                fingerprint=fingerprint, text_len=config.model.text_len, progress=self.progress,
            )
        self.loader = make_loader(
            self.source,
            config.data,
            text_tokenizer=self.text_tokenizer,
            batch_size=config.batch_size,
            text_len=config.model.text_len,
            state=data_state,
        )
        self._data_state = self.loader.get_state()
        if self.out_dir is not None and self.is_main:
            # Lines of steps after the restored one were logged by a run that died before
            # its next checkpoint; those steps are trained again.
            truncate_metrics(self.folder.metrics, self.step)

    def _text_tokenizer(self, reuse: bool) -> CaptionTokenizer:
        # A resumed run must read captions exactly as before: reuse the saved tokenizer.
        saved = self.folder.text_tokenizer if self.folder is not None else None
        if reuse and saved is not None and saved.exists():
            return load_caption_tokenizer(saved)
        tokenizer = caption_tokenizer(self.source, self.config.model)
        if saved is not None and self.is_main:
            saved.parent.mkdir(parents=True, exist_ok=True)
            tokenizer.save(saved)
        return tokenizer

    def _restore(self) -> dict[str, Any]:
        like = {"state": self.state, "frozen": self.frozen}
        shardings = {
            "state": self.state_sharding,
            "frozen": jax.tree.map(lambda x: x.sharding, self.frozen),
        }
        restored, data_state, step = self.checkpoints.restore(
            like, shardings=shardings, config=to_dict(self.config)
        )
        self.state, self.frozen = restored["state"], restored["frozen"]
        if self.progress:
            print(f"resumed from step {step} of {self.checkpoints.directory}")
        return data_state

    # -- models ---------------------------------------------------------------------------
    def model(self, ema: bool = True) -> FluidModel | AutoencoderObjective:
        """The current model (an `AutoencoderObjective` in a tokenizer run), with EMA weights
        by default (as used for evaluation).

        Its arrays are the training state's own, which the jitted step donates: take a copy
        (`jax.tree.map(jnp.copy, model)`) to keep a model across further `run` calls.
        """
        params = self.state.ema if ema else self.state.params
        return eqx.combine(params, self.frozen, self.static)

    @property
    def step(self) -> int:
        return int(self.state.step)

    @property
    def skipped(self) -> int:
        """Records the loader could not read so far (each warned about once)."""
        return self.loader.skipped

    # -- loop -----------------------------------------------------------------------------
    def run(
        self,
        steps: int | None = None,
        *,
        time_budget: float | None = None,
        callback: Callable[["Trainer", dict[str, float | int]], None] | None = None,
    ) -> list[dict[str, float | int]]:
        """Train for `steps` (default: up to `config.steps`) or until `time_budget` seconds.

        A checkpoint is written every `config.checkpoint_every` steps and when the run ends,
        if the trainer has an `out_dir`. Ctrl-C (SIGINT) stops after the step it lands in:
        the trainer writes a checkpoint of that step and raises `TrainingInterrupted` (a
        `KeyboardInterrupt`); a second Ctrl-C stops at once, keeping the last checkpoint.
        Each step's record is appended to `metrics.jsonl` as it finishes and synced to disk
        before every checkpoint. Returns the metrics of every step run here (also appended
        to `self.history`).
        """
        config = self.config
        total = config.steps if steps is None else self.step + steps
        bsz = config.batch_size
        log = writer = None
        if self.out_dir is not None and self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.folder.write_config(config)
            log = MetricsLog(self.folder.metrics)
            writer = SummaryWriter(self.folder.tensorboard)
            if self.step > 0:
                writer.restart_at(self.step + 1)
        start = time.perf_counter()
        bar = tqdm(total=total, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True)
        out = []
        try:
            with DeferredInterrupt() as interrupt:
                last = time.perf_counter()
                while self.step < total and not interrupt.requested:
                    with warnings.catch_warnings():
                        warnings.simplefilter("always", SkippedRecordWarning)
                        batch = next(self.loader)
                    batch = shard_batch(batch, self.mesh)
                    self.state, metrics = self.step_fn(self.state, self.frozen, batch)
                    metrics = {k: float(v) for k, v in metrics.items()}
                    # The position of the last batch the model consumed: what a checkpoint
                    # of this state must hold.
                    self._data_state = self.loader.get_state()
                    now = time.perf_counter()
                    record = {
                        "step": self.step,
                        **metrics,
                        "step_time": now - last,
                        "images_per_sec": bsz / max(now - last, 1e-9),
                        "skipped_records": self.skipped,
                    }
                    last = now
                    at_log = self.step % max(config.log_every, 1) == 0 or self.step == total
                    if at_log:
                        record.update(self.evaluate())
                        last = time.perf_counter()  # evaluating is not part of the next step
                    out.append(record)
                    self.history.append(record)
                    if not np.isfinite(record["loss"]):
                        raise TrainingDiverged(
                            f"loss is {record['loss']} at step {self.step}; lower the learning "
                            "rate or check the data."
                        )
                    if log is not None:
                        log.write(record)
                        writer.scalars(self.step, {k: v for k, v in record.items() if k != "step"})
                    bar.update(1)
                    if at_log:
                        bar.set_postfix(
                            loss=f"{record['loss']:.4f}",
                            step_s=f"{record['step_time']:.3f}",
                            img_s=f"{record['images_per_sec']:.1f}",
                            **{k: f"{record[k]:.2f}" for k in ("psnr",) if k in record},
                        )
                    if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                        self._checkpoint(log, writer)
                    if config.sample_every and self.step % config.sample_every == 0:
                        self.sample_grid()
                    if callback is not None:
                        callback(self, record)
                    if time_budget is not None and now - start > time_budget:
                        break
                saved = self._checkpoint(log, writer) if self.step > 0 else None
                if interrupt.requested:
                    raise TrainingInterrupted(self.step, None if saved is None else str(saved))
        finally:
            bar.close()
            if log is not None:
                log.close()
                writer.close()
        return out

    def _checkpoint(self, log: MetricsLog | None, writer: SummaryWriter | None) -> Path | None:
        # Metrics up to this step reach the disk before the checkpoint that holds the step.
        if log is not None:
            log.sync()
            writer.flush()
        return self.checkpoint()

    # -- evaluation -----------------------------------------------------------------------
    def held_out_images(self) -> jax.Array:
        """The fixed images that `evaluate` (and a tokenizer run's `sample_grid`) use,
        replicated on the mesh: the `EVAL_IMAGES` items of `fit_images`, from the far end
        of the unbounded built-in data set (a shuffled order of 2**31 items, of which a
        run reads a vanishing fraction); from a finite source or files, its first readable
        items, which training reads too."""
        if self._held_out is None:
            images = fit_images(self.source, EVAL_IMAGES)
            self._held_out = jax.device_put(images, NamedSharding(self.mesh, PartitionSpec()))
        return self._held_out

    def evaluate(self) -> dict[str, float]:
        """Metrics of the EMA model on held-out data, logged every `log_every` steps: in a
        tokenizer run, `psnr` (dB, see `fluid.tokenizers.psnr`) of the deterministic
        reconstructions of `held_out_images()`; none for a generative model."""
        return self.task.evaluate(self)

    # -- outputs --------------------------------------------------------------------------
    def checkpoint(self) -> Path | None:
        """Write a resumable checkpoint of the whole state at the current step."""
        if self.checkpoints is None:
            return None
        if self.step not in self.checkpoints.all_steps():
            # `fluid.run.load_model` reads a model back from these names, `state.ema.<path>`
            # (or `state.params.<path>`) and `frozen.<path>`.
            self.checkpoints.save(
                self.step,
                {"state": self.state, "frozen": self.frozen},
                config=to_dict(self.config),
                data_state=self._data_state,
            )
        return Path(str(self.checkpoints.step_directory(self.step)))

    def sample_grid(self, prompts: Sequence[str] | None = None) -> Path | None:
        """Sample the demo prompts with the EMA model into `samples/step_<n>.png`; in a
        tokenizer run, 8 held-out images above their reconstructions."""
        if self.out_dir is None:
            return None
        return self.task.sample_grid(self, self.folder.sample_grid(self.step), prompts)

    def save(self, directory: str | Path | None = None) -> Path:
        """Write the EMA model, the config and the text tokenizer (see `load_model`); in a
        tokenizer run, the config and the EMA tokenizer as a diffusers folder, `tokenizer/`
        (`save_pretrained`: the `kl`/`vq` spec's `path`, and diffusers, read it)."""
        directory = Path(directory or self.out_dir)
        model = self.model(ema=True)
        if jax.process_count() > 1:  # every process joins the gather; one writes
            from jax.experimental import multihost_utils

            arrays, rest = eqx.partition(model, eqx.is_array)
            arrays = multihost_utils.process_allgather(arrays, tiled=True)
            model = eqx.combine(arrays, rest)
        if not self.is_main:
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        RunFolder(directory).write_config(self.config)
        self.task.save(self, model, directory)
        return directory
