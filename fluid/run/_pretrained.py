"""A trained model as a folder: `config.json`, the caption tokenizer, `model.safetensors`
(every array by its dotted path name, readable without fluid and without pickle) and a
model card. `save_pretrained` writes one, `load_pretrained` reads it back."""

import datetime
import os
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np

from .._errors import MissingInputError
from .._paths import path_name
from .._weights import WeightError, read_safetensors, write_safetensors
from ..build import build_model, count_params
from ..config import TrainConfig
from ..model import FluidModel
from ..text import CaptionTokenizer, load_caption_tokenizer
from ._layout import RunFolder

FORMAT = "fluid-pretrained-1"


class PretrainedMismatchError(WeightError):
    """A pretrained folder's weights do not fit the model its config describes."""


def _arrays(model: FluidModel) -> dict[str, np.ndarray]:
    flat, _ = jtu.tree_flatten_with_path(model)
    return {path_name(path): np.asarray(leaf) for path, leaf in flat if eqx.is_array(leaf)}


def save_pretrained(
    folder: str | os.PathLike,
    model: FluidModel,
    text_tokenizer: CaptionTokenizer,
    config: TrainConfig,
    *,
    step: int | None = None,
    evaluation: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as a pretrained folder (`load_pretrained`, `fluid.load` read it).

    **Arguments:**

    - `folder`: created if needed; its earlier files of the same names are replaced.
    - `model`, `text_tokenizer`, `config`: the trained model, the caption tokenizer it reads
      captions with, and the config it was trained under (sampling defaults come from it).
    - `step`: the training step of the weights, for the model card.
    - `evaluation`: figures for the model card (`fluid eval`'s result: validation loss,
      ShapesEval, Frechet distance), if any.
    """
    run = RunFolder(folder)
    run.root.mkdir(parents=True, exist_ok=True)
    run.write_config(config)
    text_tokenizer.save(run.text_tokenizer)
    arrays = _arrays(model)
    write_safetensors(run.weights, arrays, metadata={
        "format": FORMAT, "step": "" if step is None else str(step),
    })
    run.model_card.write_text(model_card(model, config, step=step, evaluation=evaluation,
                                         folder=run.root))
    return run.root


def model_card(
    model: FluidModel,
    config: TrainConfig,
    *,
    step: int | None,
    evaluation: dict[str, Any] | None,
    folder: Path,
) -> str:
    """The `README.md` of a pretrained folder."""
    m = config.model
    parts = "\n".join(
        f"| {kind} | `{spec.name}` | `{type(getattr(model, attr)).__name__}` |"
        for kind, attr, spec in (
            ("image tokenizer", "tokenizer", m.tokenizer), ("output head", "head", m.head),
            ("generation order", "order", m.order), ("backbone", "backbone", m.backbone),
            ("text encoder", "text_encoder", m.text_encoder),
        )
    )
    data = config.data.dataset + (f" at `{config.data.path}`" if config.data.path else "")
    lines = [
        "# A fluid text-to-image model",
        "",
        (f"An autoregressive text-to-image model of {count_params(model) / 1e6:.2f}M parameters, "
        f"{m.backbone.name} backbone in {m.order.name} order over "
        f"{model.seq_len} tokens, made with fluid "
        f"({datetime.date.today().isoformat()})."),
        "",
        "| part | spec | class |",
        "|---|---|---|",
        parts,
        "",
        "## Training",
        "",
        f"- data: {data}, {config.data.image_size} px",
        (f"- {config.steps if step is None else step} steps of batch {config.batch_size}, "
        f"learning rate {config.optim.learning_rate:g} ({config.optim.schedule}), "
        f"EMA decay {config.optim.ema_decay:g}, seed {config.seed}"),
        "- the whole configuration: `config.json`",
        "",
        "## Evaluation",
        "",
    ]
    if evaluation:
        lines += [f"- {k}: {v}" for k, v in evaluation.items()]
    else:
        lines.append("Not evaluated when saved: `fluid eval` on this folder reports validation "
                     "loss, ShapesEval and the Frechet distance.")
    lines += [
        "",
        "## Sampling",
        "",
        "```python",
        "import fluid",
        f'pipe = fluid.load("{folder}")',
        'images = pipe(["a red circle"], seed=0)  # PIL images',
        "```",
        "",
        (f"Defaults of this model: {config.sample_steps} steps, guidance {config.sample_cfg:g}, "
        f"temperature {config.sample_temperature:g}. From the shell: "
        f"`fluid sample {folder} --prompt \"a red circle\"`."),
        "",
        ("`model.safetensors` holds every array under its dotted path in the `FluidModel`; it "
        "is plain safetensors, readable without fluid."),
        "",
    ]
    return "\n".join(lines)


def is_pretrained(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a pretrained folder (it has `model.safetensors`)."""
    return RunFolder(folder).weights.is_file()


def load_pretrained(
    folder: str | os.PathLike,
) -> tuple[FluidModel, CaptionTokenizer, TrainConfig]:
    """The model, caption tokenizer and config of a pretrained folder.

    Every array of the model its config describes must be in `model.safetensors` with its
    shape and dtype, and nothing else may be there: weights saved from another config are
    refused with the first names that differ (`PretrainedMismatchError`).
    """
    run = RunFolder(folder)
    if not run.weights.is_file():
        raise MissingInputError(
            f"{run.root} is not a pretrained folder: it has no {run.weights.name} "
            "(save_pretrained writes one; a run folder loads with fluid.load too)."
        )
    config = run.read_config()
    text_tokenizer = load_caption_tokenizer(run.text_tokenizer)
    skeleton = eqx.filter_eval_shape(
        build_model, config.model, text_tokenizer=text_tokenizer, key=jr.key(0)
    )
    tensors = read_safetensors(run.weights)
    flat, treedef = jtu.tree_flatten_with_path(skeleton)
    wanted = {path_name(path): leaf for path, leaf in flat if isinstance(leaf, jax.ShapeDtypeStruct)}
    missing = sorted(set(wanted) - set(tensors))
    extra = sorted(set(tensors) - set(wanted))
    wrong = [
        f"{name} is {tensors[name].dtype}{list(tensors[name].shape)}, the config's model has "
        f"{wanted[name].dtype}{list(wanted[name].shape)}"
        for name in sorted(set(wanted) & set(tensors))
        if tensors[name].shape != wanted[name].shape or tensors[name].dtype != wanted[name].dtype
    ]
    if missing or extra or wrong:
        said = [f"missing {missing[:3]}" if missing else "",
                f"not in the model {extra[:3]}" if extra else "", "; ".join(wrong[:3])]
        raise PretrainedMismatchError(
            f"{run.weights} does not fit the model of {run.config}: "
            + "; ".join(s for s in said if s)
            + ". Were the weights saved from another config? Save them again with "
            "save_pretrained."
        )
    leaves = [
        jnp.asarray(tensors[path_name(path)]) if isinstance(leaf, jax.ShapeDtypeStruct) else leaf
        for path, leaf in flat
    ]
    return jtu.tree_unflatten(treedef, leaves), text_tokenizer, config
