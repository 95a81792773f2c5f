"""The trainer knows no model: it trains an objective it has never heard of."""

import ast
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import fluid
from fluid.config import OptimConfig, TrainConfig
from fluid.train import AbstractObjective, Trainer, open_checkpoints

TRAIN = Path(fluid.__file__).parent / "train"


class LeastSquares(AbstractObjective):
    def loss_terms(self, model, batch, keys):
        error = jax.vmap(model)(batch["x"]) - batch["y"]
        return jnp.sum(error**2, axis=-1), jnp.full(error.shape[0], error.shape[1], jnp.float32)


def _batches(w, b, size=16, seed=0):
    rng = np.random.default_rng(seed)
    while True:
        x = rng.normal(size=(size, 3)).astype(np.float32)
        yield {"x": x, "y": x @ w.T + b}


def _config(**changes) -> TrainConfig:
    optim = OptimConfig(learning_rate=0.1, schedule="cosine", warmup_steps=0, weight_decay=0.0,
                        ema_decay=0.0)
    return TrainConfig(**{"steps": 150, "batch_size": 16, "log_every": 50, "optim": optim,
                          **changes})


def test_the_trainer_trains_an_objective_it_never_heard_of(tmp_path):
    w = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], np.float32)
    b = np.array([0.5, -0.25], np.float32)
    model = eqx.nn.Linear(3, 2, key=jr.key(0))
    evaluated = []

    def evaluate(trainer):
        out = trainer.model(ema=False)
        error = float(jnp.max(jnp.abs(out.weight - w)))
        evaluated.append(trainer.step)
        return {"weight_error": error}

    trainer = Trainer(model, LeastSquares(), _batches(w, b), config=_config(),
                      out_dir=tmp_path, progress=False, evaluate=evaluate)
    history = trainer.run()
    assert [r["step"] for r in history] == list(range(1, 151))
    assert history[-1]["loss"] < 1e-3 * history[0]["loss"]
    # The loss is the mean over every term of the batch: sum(total) / sum(count).
    trained = trainer.model(ema=False)
    np.testing.assert_allclose(trained.weight, w, atol=1e-2)
    np.testing.assert_allclose(trained.bias, b, atol=1e-2)
    assert evaluated == [50, 100, 150]
    assert "weight_error" in history[49] and "weight_error" not in history[48]
    # A plain iterator has no position to save; the run still checkpoints and resumes.
    resumed = Trainer(eqx.nn.Linear(3, 2, key=jr.key(1)), LeastSquares(), _batches(w, b),
                      config=_config(), out_dir=tmp_path, progress=False)
    assert resumed.step == 150
    np.testing.assert_array_equal(resumed.model(ema=False).weight, trained.weight)


def test_the_trainer_takes_the_checkpoints_of_its_out_dir_and_no_others(tmp_path):
    # A recipe opens a run's checkpoints once, before the loader exists, and hands them over.
    w, b = np.ones((2, 3), np.float32), np.zeros(2, np.float32)
    config = _config()
    opened = open_checkpoints(tmp_path / "run", config)
    trainer = Trainer(eqx.nn.Linear(3, 2, key=jr.key(0)), LeastSquares(), _batches(w, b),
                      config=config, out_dir=tmp_path / "run", progress=False,
                      checkpoints=opened)
    assert trainer.checkpoints is opened and opened.keep == config.keep_checkpoints
    for out_dir in (tmp_path / "other", None):
        with pytest.raises(ValueError, match="not those of out_dir"):
            Trainer(eqx.nn.Linear(3, 2, key=jr.key(0)), LeastSquares(), _batches(w, b),
                    config=config, out_dir=out_dir, progress=False, checkpoints=opened)


def test_the_loss_is_the_objectives_mean_and_the_filter_decides_what_trains():
    w = np.eye(2, 3, dtype=np.float32)
    model = eqx.nn.Linear(3, 2, key=jr.key(0))
    batch = next(_batches(w, np.zeros(2, np.float32), size=8))
    # Only the bias trains: a filter spec with the model's structure.
    only_bias = jax.tree.map(lambda _: False, model)
    only_bias = eqx.tree_at(lambda m: m.bias, only_bias, replace=True)
    trainer = Trainer(model, LeastSquares(), iter([batch]), config=_config(steps=1),
                      trainable=only_bias, progress=False, optimizer=optax.sgd(0.5))
    [record] = trainer.run()
    error = jax.vmap(model)(batch["x"]) - batch["y"]
    np.testing.assert_allclose(record["loss"], float(jnp.mean(error**2)), rtol=1e-6)
    after = trainer.model(ema=False)
    np.testing.assert_array_equal(after.weight, model.weight)
    # SGD on the mean squared error over 8 examples x 2 outputs.
    grad_b = 2 * np.asarray(error).sum(0) / error.size
    np.testing.assert_allclose(after.bias, model.bias - 0.5 * grad_b, rtol=1e-5, atol=1e-7)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            found.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.ImportFrom):
            found.add(node.module or "")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_the_trainer_imports_no_model():
    # What the trainer may read of fluid: plain config, errors and types, the run folder,
    # the stacked-layer marker (sharding) and the data's warning category; never a model,
    # a component that makes one, or a recipe.
    allowed = {"..config", "..run", "..nn", "..data", ".._types", ".._errors", ".._paths"}
    for path in sorted(TRAIN.glob("*.py")):
        ours = {m for m in _imports(path) if m.startswith("..")}
        assert ours <= allowed, f"{path.name} imports {sorted(ours - allowed)}"
    # The check reads the imports it is for.
    assert "..run" in _imports(TRAIN / "_trainer.py")
