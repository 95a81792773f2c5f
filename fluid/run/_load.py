"""Finding and loading the weights a run wrote: its saved `model.eqx` or a checkpoint.

A run's checkpoint (`Trainer.checkpoint`) holds `{"state": TrainState, "frozen": ...}`:
the trained leaves of the model under `state.params.<path>` (raw) and `state.ema.<path>`
(their moving average), every other array of the model under `frozen.<path>`, beside the
optimiser's state. A model is read back from it by name, the optimiser's arrays unread: which
leaves were trained is what the checkpoint says, not something rebuilt here.
"""

import dataclasses
import os
from pathlib import Path

import jax
import jax.random as jr
import jax.tree_util as jtu

from .._errors import ConfigError, MissingInputError
from .._paths import path_name
from ..build import build_model
from ..config import TrainConfig, from_dict
from ..model import FluidModel
from ..text import CaptionTokenizer, load_caption_tokenizer
from ._checkpoint import COMMIT_FILE, CheckpointManager, _is_array_like
from ._integrity import load_model_file, read_model_info
from ._layout import RunFolder

# Where a run's checkpoint keeps the model's leaves (see the module's docstring).
_EMA, _RAW, _FROZEN = "state.ema", "state.params", "frozen"


@dataclasses.dataclass(frozen=True)
class SavedWeights:
    """Which weights `load_model(path)` reads.

    - `kind`: `"model"` (a saved `model.eqx`, EMA weights only) or `"checkpoint"`.
    - `path`: the `model.eqx` file or the checkpoint's directory.
    - `run_dir`: the folder holding the run's `config.json` / `checkpoints/` /
      `text_tokenizer.model`.
    - `step`: the training step of the weights (`None` for a model saved without its step,
      by an older fluid).
    """

    kind: str
    path: Path
    run_dir: Path
    step: int | None

    def describe(self) -> str:
        what = "saved model" if self.kind == "model" else "checkpoint"
        at = f"step {self.step}" if self.step is not None else "an unknown step"
        return f"{at} from the {what} {self.path}"


def find_weights(path: str | os.PathLike, *, ema: bool = True) -> SavedWeights:
    """The newest weights under `path`, as `load_model` and `fluid sample`/`eval` read them.

    **Arguments:**

    - `path`: a run's output directory (the newer of its saved `model.eqx` and its latest
      complete checkpoint; on a tie the saved model, which holds the same EMA weights); one
      checkpoint, `<run>/checkpoints/<step>`; or a directory `Recipe.save` wrote.
    - `ema`: `False` asks for the raw weights, which only checkpoints hold.

    **Returns:**

    A `SavedWeights`. Raises `FileNotFoundError` naming what `path` should hold.
    """
    path = Path(path)
    checkpoint = RunFolder.of_checkpoint(path)
    if checkpoint is not None:
        run, step = checkpoint
        return SavedWeights("checkpoint", path, run.root, step)
    folder = RunFolder(path)
    found = []
    if folder.model.exists():
        info = read_model_info(folder.model)
        step = info.get("step") if info else None
        found.append(SavedWeights("model", folder.model, path, step))
    if folder.checkpoints.is_dir():
        with CheckpointManager(folder.checkpoints, keep=None) as manager:
            step = manager.latest_step()
            if step is not None:
                found.append(SavedWeights(
                    "checkpoint", Path(str(manager.step_directory(step))), path, step
                ))
    if not ema:
        saved = [w for w in found if w.kind == "model"]
        found = [w for w in found if w.kind == "checkpoint"]
        if not found and saved:
            raise MissingInputError(
                f"{saved[0].path} holds only the EMA weights, and {path} has no complete "
                "checkpoint with the raw ones; drop --raw (ema=False) to load the EMA weights."
            )
    if not found:
        raise MissingInputError(
            f"{path} holds neither a saved model ({folder.model.name}) nor a complete "
            "checkpoint; pass a run's output directory, one of its checkpoints/<step>, or a "
            "directory Recipe.save wrote."
        )
    if len(found) == 1:
        return found[0]
    model, checkpoint = found
    if model.step is None:  # saved by an older fluid: the newer file wins
        newer = model.path.stat().st_mtime >= (checkpoint.path / COMMIT_FILE).stat().st_mtime
        return model if newer else checkpoint
    return model if model.step >= checkpoint.step else checkpoint


def _check_generative(config: TrainConfig, run_dir: Path) -> None:
    # A tokenizer run's result is its saved tokenizer, which a tokenizer spec's `path` reads.
    if config.task == "tokenizer":
        raise ConfigError(
            f"{run_dir} trained an image tokenizer, not a generative model: it is the "
            f"diffusers folder {RunFolder(run_dir).tokenizer} (a "
            f"{config.model.tokenizer.name!r} tokenizer spec's `path`)."
        )


def _restore_model(
    manager: CheckpointManager, step: int, skeleton: FluidModel, *, ema: bool
) -> FluidModel:
    """`skeleton` with every array read from the checkpoint of `step`: trained leaves from
    the EMA (or raw) weights, the others from the frozen ones."""
    weights = _EMA if ema else _RAW
    flat, treedef = jtu.tree_flatten_with_path(skeleton)
    keys = {}
    for i, (path, leaf) in enumerate(flat):
        if _is_array_like(leaf):
            name = path_name(path)
            keys[i] = (f"{weights}.{name}", f"{_FROZEN}.{name}")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    arrays, _ = manager.restore_leaves(
        {keys[i]: flat[i][1] for i in keys}, step=step, sharding=device,
        complete=(weights, _FROZEN),
    )
    leaves = [arrays[keys[i]] if i in keys else leaf for i, (_, leaf) in enumerate(flat)]
    return jtu.tree_unflatten(treedef, leaves)


def load_model(
    path: "str | os.PathLike | SavedWeights", *, ema: bool = True
) -> tuple[FluidModel, CaptionTokenizer, TrainConfig]:
    """A trained model, its text tokenizer and its config, from what training wrote.

    **Arguments:**

    - `path`: a directory `Recipe.save` wrote (`model.eqx` + `config.json`); or a run's
      output directory (the newer of its saved model and its latest complete checkpoint,
      see `find_weights`); or one checkpoint, `<run>/checkpoints/<step>`; or what
      `find_weights` returned.
    - `ema`: the EMA weights (as evaluation uses) or the raw ones (from a checkpoint only).

    The arrays land on the default device, whatever mesh the run used; a checkpoint's
    optimiser state is not read. A saved model is verified against the checksum written with
    it (`CorruptModelError` if it changed).
    """
    weights = path if isinstance(path, SavedWeights) else find_weights(path, ema=ema)
    run = RunFolder(weights.run_dir)
    if weights.kind == "model":
        config = run.read_config()
        _check_generative(config, run.root)
        text_tokenizer = load_caption_tokenizer(run.text_tokenizer)
        skeleton = build_model(config.model, text_tokenizer=text_tokenizer, key=jr.key(0))
        return load_model_file(weights.path, skeleton), text_tokenizer, config
    with CheckpointManager(run.checkpoints, keep=None) as manager:
        config = from_dict(TrainConfig, manager.saved_config(weights.step))
        _check_generative(config, run.root)
        text_tokenizer = load_caption_tokenizer(run.text_tokenizer)
        skeleton = build_model(config.model, text_tokenizer=text_tokenizer, key=jr.key(0))
        model = _restore_model(manager, weights.step, skeleton, ema=ema)
    return model, text_tokenizer, config
