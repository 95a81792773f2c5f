"""Recipes: what a training run trains, wired for the `Trainer` (which knows none of it).

A recipe reads a `TrainConfig`'s data, caption tokenizer, model and token cache, and hands
the trainer a model, a trainable filter, an objective and a loader; it draws the run's
sample grids, saves and reports it. One recipe per `TrainConfig.task`: `generate`
(`GenerateRecipe`, a `FluidModel`) and `tokenizer` (`TokenizerRecipe`, an image tokenizer
as an autoencoder). `prepare(config)` picks the recipe and wires the run.
"""

from ._cache import CachedSource as CachedSource
from ._cache import CacheMismatchError as CacheMismatchError
from ._cache import build_cache as build_cache
from ._cache import cache_fingerprint as cache_fingerprint
from ._cache import cached_source as cached_source
from ._data import caption_tokenizer as caption_tokenizer
from ._data import demo_prompts as demo_prompts
from ._data import fit_images as fit_images
from ._data import grid_captions as grid_captions
from ._data import make_loader as make_loader
from ._data import make_source as make_source
from ._data import make_text_tokenizer as make_text_tokenizer
from ._generate import FluidObjective as FluidObjective
from ._generate import GenerateRecipe as GenerateRecipe
from ._generate import cast_backbone as cast_backbone
from ._generate import resolve_precision as resolve_precision
from ._generate import trainable_mask as trainable_mask
from ._recipe import Recipe as Recipe
from ._registry import RECIPES as RECIPES
from ._registry import get_recipe as get_recipe
from ._registry import prepare as prepare
from ._tokenizer import EVAL_IMAGES as EVAL_IMAGES
from ._tokenizer import TokenizerRecipe as TokenizerRecipe
