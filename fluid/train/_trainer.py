"""The one training loop of fluid: a jitted step over trainable parameters, AdamW, EMA.

The trainer knows no model: it takes an initial model (or a function that builds it), which
of its leaves train (an Equinox filter), an objective (`AbstractObjective`) and a loader of
batches. What a run trains and how its data, caption tokenizer and token cache are wired is
a recipe's business (`fluid.recipes`).
"""

import functools
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Int
from tqdm.auto import tqdm

from .._errors import TrainingDiverged
from .._types import Key
from ..config import TrainConfig, to_dict
from ..data import SkippedRecordWarning
from ..run import CheckpointManager, MetricsLog, RunFolder, SummaryWriter, truncate_metrics
from ._interrupt import DeferredInterrupt, TrainingInterrupted
from ._objective import AbstractObjective
from ._optim import ema_update, global_norm, make_optimizer
from ._sharding import create_sharded, make_mesh, put_sharded, shard_batch, state_shardings


class TrainState(eqx.Module):
    """Everything that changes during training; a pytree that goes in and out of the step."""

    params: Any  # trainable leaves of the model (None elsewhere)
    opt_state: Any
    ema: Any  # exponential moving average of `params`
    step: Int[Array, ""]
    key: Key


def config_mesh(config: TrainConfig, devices=None) -> Mesh:
    """The mesh `config.mesh` describes, over `devices` (all by default)."""
    return make_mesh({"data": config.mesh.data, "model": config.mesh.model}, devices)


def place_model(model: Any, mesh: Mesh, config: TrainConfig) -> Any:
    """`model` with its arrays sharded on `mesh` by the rules of `config.mesh`.

    A function of no arguments is traced and run under `jax.jit` with the shardings as
    outputs (`create_sharded`: no device holds an unsharded copy); a built tree is moved
    (`put_sharded`), which is how to place weights read from files on the host, which under
    `jit` would become constants of the compiled program.
    """
    rules, min_size = config.mesh.rules, config.mesh.min_shard_size
    if callable(model) and not isinstance(model, eqx.Module):
        return create_sharded(model, mesh, rules, min_size=min_size)
    return put_sharded(model, mesh, rules, min_size=min_size)


def is_main_process() -> bool:
    """Whether this process writes files and prints: on several hosts every process
    computes, process 0 alone writes and prints (orbax coordinates the checkpoint writes
    itself)."""
    return jax.process_index() == 0


def open_checkpoints(out_dir: str | Path, config: TrainConfig) -> CheckpointManager:
    """The checkpoints of a run writing into `out_dir` (its `checkpoints/`, keeping the
    newest `config.keep_checkpoints`), as the `Trainer` opens them."""
    return CheckpointManager(RunFolder(out_dir).checkpoints, keep=config.keep_checkpoints)


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


def _train_step(state, frozen, batch, *, static, objective, optimizer, ema_decay, grad_accum):
    key, sub = jr.split(state.key)
    keys = jr.split(sub, jax.tree.leaves(batch)[0].shape[0])

    def sums(params, micro, micro_keys):
        model = eqx.combine(params, frozen, static)
        total, count = objective.loss_terms(model, micro, micro_keys)
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


def _all_states(state: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint records of the loaders' positions: this process's `state`, or on
    several processes `{"processes": [state of process 0, 1, ...]}` (every process takes
    part; process 0 alone writes the checkpoint's JSON)."""
    if jax.process_count() == 1:
        return state
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(state).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int32))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = multihost_utils.process_allgather(padded)
    return {"processes": [json.loads(bytes(row[: int(n)])) for row, (n,) in zip(rows, sizes)]}


def _own_state(saved: dict[str, Any]) -> dict[str, Any]:
    """This process's loader position from what `_all_states` recorded. A process that the
    saving run did not have gets process 0's, which its loader refuses (or restarts from,
    under `on_change="restart"`) as a different shard."""
    if "processes" not in saved:
        return saved
    states = saved["processes"]
    return states[jax.process_index()] if jax.process_index() < len(states) else states[0]


class Trainer:
    """Trains a model on one device or a mesh: a jitted step, AdamW (or any optax
    transformation), EMA, checkpoints, metrics.

    The trainer knows no model. It takes the model (or a function that builds it), which
    leaves train, the objective it minimises and the loader that feeds it; its loop settings
    (steps, batch size, gradient accumulation, optimiser, mesh, logging, checkpoints, seed)
    come from `config`, which it also records beside every checkpoint, so that a checkpoint
    of another configuration is refused. It never reads `config.model`, `config.data` or
    `config.task`: a recipe (`fluid.recipes`) reads those to wire a run.

    The model is placed sharded by the rule set `config.mesh.rules`; each step takes a
    global batch sharded over `"data"`, accumulates `config.grad_accum` micro-batches and
    updates the state in place (donated). With an `out_dir`, it resumes from the latest
    checkpoint there (`checkpoints/`) exactly where that run stopped (the loader's
    position too, when the loader has `get_state`/`set_state`; on several processes, each
    process's own position), writes one every
    `checkpoint_every` steps, at the end and on interruption, and logs metrics to
    `metrics.jsonl` and TensorBoard.

    **Arguments:**

    - `model`: the initial model, or a function of no arguments that builds it (then built
      directly in its shardings, see `place_model`).
    - `objective`: what is minimised (`AbstractObjective`).
    - `loader`: an iterator of batches (dicts of arrays, this process's share of a global
      batch of `config.batch_size`); a `fluid.data.Loader` resumes with the run.
    - `config`: the loop's settings and the record of the run.
    - `trainable`: which leaves the optimiser updates, an Equinox filter spec (a pytree
      prefix of the model of bools, or of callables from a leaf to a bool, as
      `eqx.partition` takes); every floating-point array by default. The rest stays as it
      was built (or restored).
    - `key`: the training key (masks, noise, dropout); `jr.key(config.seed)` by default.
    - `mesh`: the device mesh; `config.mesh` over all devices by default.
    - `out_dir`: where checkpoints, metrics and the config go; `None` writes nothing.
    - `progress`: show a progress bar.
    - `resume`: continue from the latest checkpoint in `out_dir` if there is one.
    - `checkpoints`: `open_checkpoints(out_dir, config)` when the caller has opened them
      already (a recipe looks for a checkpoint to resume before it builds the loader);
      opened here when `None`.
    - `optimizer`: an optax transformation to use instead of the config's AdamW (the
      trainable mask and clipping are then up to it).
    - `evaluate`: called with the trainer every `log_every` steps and at the end; the metrics
      it returns (held-out scores of the EMA model) join that step's record.
    - `sample`: called with the trainer and a path (`samples/step_<n>.png`) every
      `sample_every` steps, to draw what the model does now.
    """

    def __init__(
        self,
        model: Any,
        objective: AbstractObjective,
        loader: Iterator[dict[str, Any]],
        *,
        config: TrainConfig,
        trainable: Any = eqx.is_inexact_array,
        key: Key | None = None,
        mesh: Mesh | None = None,
        out_dir: str | Path | None = None,
        progress: bool = True,
        resume: bool = True,
        checkpoints: CheckpointManager | None = None,
        optimizer: optax.GradientTransformation | None = None,
        evaluate: Callable[["Trainer"], dict[str, float]] | None = None,
        sample: Callable[["Trainer", Path], Any] | None = None,
    ):
        self.config = config
        self.objective = objective
        self.loader = loader
        self.out_dir = Path(out_dir) if out_dir is not None else None
        # Every path under `out_dir` (`fluid.run.RunFolder`).
        self.folder = RunFolder(self.out_dir) if self.out_dir is not None else None
        self.is_main = is_main_process()
        self.progress = progress and self.is_main
        self.mesh = config_mesh(config) if mesh is None else mesh
        self._evaluate, self._sample = evaluate, sample
        if checkpoints is not None and (
            self.out_dir is None
            or str(checkpoints.directory) != os.path.abspath(self.folder.checkpoints)
        ):
            raise ValueError(f"checkpoints in {checkpoints.directory} are not those of out_dir "
                             f"{self.out_dir}: open them with open_checkpoints(out_dir, config).")
        if self.out_dir is not None and checkpoints is None:
            checkpoints = open_checkpoints(self.out_dir, config)
        self.checkpoints = checkpoints
        resuming = resume and self.checkpoints is not None and (
            self.checkpoints.latest_step() is not None
        )
        key = jr.key(config.seed) if key is None else key

        model = place_model(model, self.mesh, config)
        params, rest = eqx.partition(model, trainable)
        self.frozen, self.static = eqx.partition(rest, eqx.is_array)
        self.optimizer = optimizer or make_optimizer(config.optim, config.steps)

        rules, min_size = config.mesh.rules, config.mesh.min_shard_size
        init = functools.partial(_init_state, optimizer=self.optimizer)
        abstract = eqx.filter_eval_shape(init, params, key)
        self.state_sharding = state_shardings(abstract, self.mesh, rules, min_size=min_size)
        self.state = jax.jit(init, out_shardings=self.state_sharding)(params, key)
        self.step_fn = jax.jit(
            functools.partial(
                _train_step,
                static=self.static,
                objective=objective,
                optimizer=self.optimizer,
                ema_decay=config.optim.ema_decay,
                grad_accum=config.grad_accum,
            ),
            out_shardings=(self.state_sharding, NamedSharding(self.mesh, PartitionSpec())),
            donate_argnums=(0,),
        )
        self.history: list[dict[str, float | int]] = []

        if resuming:
            data_state = _own_state(self._restore())
            if data_state and hasattr(loader, "set_state"):
                loader.set_state(data_state)
        self._data_state = self._loader_state()
        if self.out_dir is not None and self.is_main:
            # Lines of steps after the restored one were logged by a run that died before
            # its next checkpoint; those steps are trained again.
            truncate_metrics(self.folder.metrics, self.step)

    def _loader_state(self) -> dict[str, Any]:
        # A loader without `get_state` (a plain iterator) has no position to save.
        get_state = getattr(self.loader, "get_state", None)
        return {} if get_state is None else get_state()

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
    def model(self, ema: bool = True) -> Any:
        """The current model, with EMA weights by default (as used for evaluation).

        Its arrays are the training state's own, which the jitted step donates: take a copy
        (`jax.tree.map(jnp.copy, model)`) to keep a model across further `run` calls.
        """
        params = self.state.ema if ema else self.state.params
        return eqx.combine(params, self.frozen, self.static)

    def gathered_model(self, ema: bool = True) -> Any:
        """`model(ema)` with every array whole on this host, for writing it to a file: on
        several hosts every process must call this (each joins the gather)."""
        model = self.model(ema)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            arrays, rest = eqx.partition(model, eqx.is_array)
            arrays = multihost_utils.process_allgather(arrays, tiled=True)
            model = eqx.combine(arrays, rest)
        return model

    @property
    def step(self) -> int:
        return int(self.state.step)

    @property
    def skipped(self) -> int:
        """Records the loader could not read so far (each warned about once)."""
        return getattr(self.loader, "skipped", 0)

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
                    self._data_state = self._loader_state()
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
                        evaluated = self.evaluate()
                        record.update(evaluated)
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
                            **{k: f"{v:.2f}" for k, v in evaluated.items()},
                        )
                    if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                        self._checkpoint(log, writer)
                    if config.sample_every and self.step % config.sample_every == 0:
                        self.sample()
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

    # -- hooks --------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of the model now (the `evaluate` hook's); none without one."""
        return {} if self._evaluate is None else dict(self._evaluate(self))

    def sample(self) -> Path | None:
        """Draw what the model does now into `samples/step_<n>.png` (the `sample` hook);
        nothing without an `out_dir` or a hook."""
        if self.out_dir is None or self._sample is None:
            return None
        return self._sample(self, self.folder.sample_grid(self.step))

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
                data_state=_all_states(self._data_state),
            )
        return Path(str(self.checkpoints.step_directory(self.step)))
