"""Starting a run from trained weights (`TrainConfig.init_from`): read the source's model
(`load_source`), then copy its arrays into a model built from the new config, by dotted path
name (`copy_weights`)."""

import dataclasses
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._errors import UserError
from .._paths import path_name
from ..config import TrainConfig
from ..model import FluidModel
from ..nn import has_lora, merge_lora
from ..text import CaptionTokenizer
from ._load import find_weights, load_model
from ._pretrained import is_pretrained, load_pretrained


class InitFromMismatchError(UserError, ValueError):
    """The weights `init_from` names do not fit the model of the new config."""


@dataclasses.dataclass(frozen=True)
class SourceModel:
    """What `init_from` starts from: `model` (its EMA weights where it has them), the
    caption tokenizer and config it was trained with, and `description`, which weights
    these are (for the line a run prints)."""

    model: FluidModel
    text_tokenizer: CaptionTokenizer
    config: TrainConfig
    description: str


@dataclasses.dataclass(frozen=True)
class CopyReport:
    """What `copy_weights` did, by dotted path: arrays `copied` from the source, arrays of
    the new model left `fresh` (not in the source), source arrays `dropped` (not in the new
    model, allowed with `strict=False`), and whether the source's adapters were `merged`."""

    copied: tuple[str, ...]
    fresh: tuple[str, ...]
    dropped: tuple[str, ...]
    merged: bool = False

    def lines(self) -> list[str]:
        """The lines a run prints about it."""
        out = [f"init_from: copied {len(self.copied)} arrays"]
        if self.merged:
            out.append("init_from: the source's LoRA adapters were merged into its weights "
                       "(this model has none)")
        if self.fresh:
            out.append(f"init_from: {len(self.fresh)} arrays not in the source keep their fresh "
                       f"initialisation: {', '.join(self.fresh)}")
        if self.dropped:
            out.append(f"init_from: {len(self.dropped)} source arrays not in this model are "
                       f"dropped (init_strict=false): {', '.join(self.dropped)}")
        return out


def load_source(path: str | os.PathLike) -> SourceModel:
    """The model `init_from=path` starts from: a pretrained folder (`load_pretrained`), or
    a run folder, one of its checkpoints or a folder `Recipe.save` wrote (`load_model`, EMA
    weights: the saved model holds only those, and a checkpoint's EMA is read rather than its
    raw weights)."""
    if is_pretrained(path):
        model, tokenizer, config = load_pretrained(path)
        return SourceModel(model, tokenizer, config, f"the weights of the pretrained folder {path}")
    weights = find_weights(path, ema=True)
    model, tokenizer, config = load_model(weights, ema=True)
    return SourceModel(model, tokenizer, config, f"the EMA weights of {weights.describe()}")


def _arrays(tree) -> dict[str, jax.Array]:
    flat, _ = jtu.tree_flatten_with_path(tree)
    return {path_name(p): x for p, x in flat if eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)}


def _show(x) -> str:
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"


def copy_weights(
    model: FluidModel, source: FluidModel, *, strict: bool = True, source_name: str = "the source"
) -> tuple[FluidModel, CopyReport]:
    """`model` with every array whose dotted path `source` has replaced by the source's.

    A source with LoRA adapters (`fluid.nn.LoRALinear`) copied into a model without them is
    merged first (`fluid.nn.merge_lora`); adapters in `model` that the source lacks stay as
    initialised (they compute nothing until they train).

    **Arguments:**

    - `model`: the model of the new config, freshly initialised.
    - `source`: the trained model.
    - `strict`: refuse source arrays with no place in `model`; `False` drops them.
    - `source_name`: how messages name the source.

    **Returns:**

    The model and a `CopyReport`.

    **Raises:**

    `InitFromMismatchError` naming every path whose shape or dtype differs, with both, and
    with `strict` every source path the model lacks.
    """
    merged = has_lora(source) and not has_lora(model)
    if merged:
        source = merge_lora(source)
    theirs = _arrays(source)
    flat, treedef = jtu.tree_flatten_with_path(model)
    ours = {path_name(p): x for p, x in flat if eqx.is_array(x)}
    wrong = [
        f"{name}: {_show(theirs[name])} in the source, {_show(x)} in this run's model"
        for name, x in ours.items()
        if name in theirs and (theirs[name].shape != x.shape or theirs[name].dtype != x.dtype)
    ]
    if wrong:
        raise InitFromMismatchError(
            f"init_from: {len(wrong)} arrays of {source_name} do not fit the model of this "
            "run's config:\n  " + "\n  ".join(wrong) + "\nSet these parts' sizes (model.width, "
            "depths, heads, the head's and tokenizer's kwargs) as the source's config.json has "
            "them, or leave init_from unset to train from scratch."
        )
    dropped = tuple(sorted(set(theirs) - set(ours)))
    if dropped and strict:
        raise InitFromMismatchError(
            f"init_from: {len(dropped)} arrays of {source_name} have no place in the model of "
            f"this run's config: {', '.join(dropped)}. Give the new config the parts they "
            "belong to, or pass init_strict=false to start without them."
        )
    leaves = [
        jnp.asarray(theirs[path_name(p)]) if eqx.is_array(x) and path_name(p) in theirs else x
        for p, x in flat
    ]
    report = CopyReport(
        copied=tuple(n for n in ours if n in theirs),
        fresh=tuple(n for n in ours if n not in theirs),
        dropped=dropped,
        merged=merged,
    )
    return jtu.tree_unflatten(treedef, leaves), report
