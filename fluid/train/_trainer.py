"""The one training loop of fluid: a jitted step over trainable parameters, AdamW, EMA."""

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Int
from tqdm.auto import tqdm

from .._types import Key
from ..build import build_model
from ..config import TrainConfig, to_dict
from ..model import FluidModel
from ..text import TextTokenizer
from ._data import Batches, fit_images, make_dataset, make_text_tokenizer
from ._optim import ema_update, global_norm, make_optimizer, trainable_mask


class TrainState(eqx.Module):
    """Everything that changes during training; a pytree that goes in and out of the step."""

    params: Any  # trainable leaves of the model (None elsewhere)
    opt_state: Any
    ema: Any  # exponential moving average of `params`
    step: Int[Array, ""]
    key: Key


def _train_step(state: TrainState, frozen, batch, *, static, optimizer, ema_decay):
    key, sub = jr.split(state.key)

    def loss_fn(params):
        model = eqx.combine(params, frozen, static)
        return model.loss(batch, key=sub)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    # optax mixes Python floats with int32 step counts, which strict promotion refuses.
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = eqx.apply_updates(state.params, updates)
    ema = ema_update(state.ema, params, ema_decay)
    metrics = {"loss": loss, "grad_norm": global_norm(grads)}
    return TrainState(params, opt_state, ema, state.step + 1, key), metrics


class Trainer:
    """Builds a model from a `TrainConfig` and trains it.

    **Arguments:**

    - `config`: the run.
    - `out_dir`: where metrics (`metrics.jsonl`), the config and the final model go; `None`
      writes nothing.
    - `progress`: show a progress bar.
    """

    def __init__(self, config: TrainConfig, *, out_dir: str | Path | None = None, progress: bool = True):
        self.config = config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.dataset = make_dataset(config.data)
        self.text_tokenizer: TextTokenizer = make_text_tokenizer(
            self.dataset, config.model.text_vocab_size
        )
        k_model, k_train = jr.split(jr.key(config.seed))
        images = fit_images(self.dataset, config.data.fit_images)
        model = build_model(
            config.model, text_tokenizer=self.text_tokenizer, key=k_model, fit_images=images
        )
        params, rest = eqx.partition(model, trainable_mask(model))
        self.frozen, self.static = eqx.partition(rest, eqx.is_array)
        self.optimizer = make_optimizer(config.optim, config.steps)
        self.state = TrainState(
            params=params,
            opt_state=self.optimizer.init(params),
            ema=jax.tree.map(jnp.copy, params),
            step=jnp.zeros((), jnp.int32),
            key=k_train,
        )
        self.step_fn = jax.jit(
            functools.partial(
                _train_step,
                static=self.static,
                optimizer=self.optimizer,
                ema_decay=config.optim.ema_decay,
            ),
            donate_argnums=(0,),
        )
        self.history: list[dict[str, float | int]] = []

    # -- models ---------------------------------------------------------------------------
    def model(self, ema: bool = True) -> FluidModel:
        """The current model, with EMA weights by default (as used for evaluation).

        Its arrays are the training state's own, which the jitted step donates: take a copy
        (`jax.tree.map(jnp.copy, model)`) to keep a model across further `run` calls.
        """
        params = self.state.ema if ema else self.state.params
        return eqx.combine(params, self.frozen, self.static)

    @property
    def step(self) -> int:
        return int(self.state.step)

    # -- loop -----------------------------------------------------------------------------
    def batches(self) -> Batches:
        return Batches(
            self.dataset,
            self.text_tokenizer,
            self.config.batch_size,
            self.config.model.text_len,
            start_step=self.step,
        )

    def run(
        self,
        steps: int | None = None,
        *,
        time_budget: float | None = None,
        callback: Callable[["Trainer", dict[str, float | int]], None] | None = None,
    ) -> list[dict[str, float | int]]:
        """Train for `steps` (default: up to `config.steps`) or until `time_budget` seconds.

        Returns the metrics of every step run here (also appended to `self.history`).
        """
        total = self.config.steps if steps is None else self.step + steps
        bsz = self.config.batch_size
        log = None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(to_dict(self.config), indent=1))
            log = open(self.out_dir / "metrics.jsonl", "a")
        start = time.perf_counter()
        bar = tqdm(total=total, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True)
        out = []
        try:
            it = iter(self.batches())
            last = time.perf_counter()
            while self.step < total:
                batch = next(it)
                self.state, metrics = self.step_fn(self.state, self.frozen, batch)
                metrics = {k: float(v) for k, v in metrics.items()}
                now = time.perf_counter()
                record = {
                    "step": self.step,
                    **metrics,
                    "step_time": now - last,
                    "images_per_sec": bsz / max(now - last, 1e-9),
                }
                last = now
                out.append(record)
                self.history.append(record)
                if not np.isfinite(record["loss"]):
                    raise FloatingPointError(
                        f"loss is {record['loss']} at step {self.step}; lower the learning "
                        "rate or check the data."
                    )
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                bar.update(1)
                if self.step % max(self.config.log_every, 1) == 0 or self.step == total:
                    bar.set_postfix(
                        loss=f"{record['loss']:.4f}",
                        step_s=f"{record['step_time']:.3f}",
                        img_s=f"{record['images_per_sec']:.1f}",
                    )
                if callback is not None:
                    callback(self, record)
                if time_budget is not None and now - start > time_budget:
                    break
        finally:
            bar.close()
            if log is not None:
                log.close()
        return out

    def save(self, directory: str | Path | None = None) -> Path:
        """Write the EMA model, the config and the text tokenizer (see `load_model`)."""
        directory = Path(directory or self.out_dir)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(to_dict(self.config), indent=1))
        self.text_tokenizer.save(directory / "text_tokenizer.model")
        eqx.tree_serialise_leaves(directory / "model.eqx", self.model(ema=True))
        return directory


def load_model(directory: str | Path) -> tuple[FluidModel, TextTokenizer, TrainConfig]:
    """Load what `Trainer.save` wrote: the model, its text tokenizer and its config."""
    from ..config import from_dict

    directory = Path(directory)
    config = from_dict(TrainConfig, json.loads((directory / "config.json").read_text()))
    text_tokenizer = TextTokenizer.load(directory / "text_tokenizer.model")
    skeleton = build_model(config.model, text_tokenizer=text_tokenizer, key=jr.key(0))
    model = eqx.tree_deserialise_leaves(directory / "model.eqx", skeleton)
    return model, text_tokenizer, config

