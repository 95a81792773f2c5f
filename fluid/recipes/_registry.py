"""The recipes by task name: `TrainConfig.task` to the `Recipe` that wires its run."""

from ..config import TrainConfig
from ._generate import GenerateRecipe
from ._recipe import Recipe
from ._tokenizer import TokenizerRecipe

# `fluid.config.TASKS` lists these names for validating a config (tests keep the two equal).
RECIPES: dict[str, type[Recipe]] = {r.name: r for r in (GenerateRecipe, TokenizerRecipe)}


def get_recipe(name: str) -> type[Recipe]:
    """The recipe class of a `TrainConfig.task` name."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; the tasks are {sorted(RECIPES)}.") from None


def prepare(config: TrainConfig, **kwargs) -> Recipe:
    """The run of `config`, wired by the recipe of `config.task` (arguments: `Recipe`)."""
    return get_recipe(config.task)(config, **kwargs)
