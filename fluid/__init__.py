"""fluid: autoregressive text-to-image generation (Fluid, MAR) as composable JAX components.

The public API, importable from `fluid` itself: the composed model and its builder, the
abstract interface of each kind of part with its registry, the plug-in slots (`SLOTS`), the
token kinds and attentions parts declare, the configuration and the errors. Names other than
the errors are imported on first use, so that `import fluid` loads no JAX.
"""

import importlib

from ._errors import ConfigError as ConfigError
from ._errors import ConfigKeyError as ConfigKeyError
from ._errors import ConfigTypeError as ConfigTypeError
from ._errors import MissingInputError as MissingInputError
from ._errors import TrainingDiverged as TrainingDiverged
from ._errors import UserError as UserError

# Not `typing.TYPE_CHECKING`: importing `typing` would double the cost of `import fluid`.
# Type checkers read this name alike.
TYPE_CHECKING = False
if TYPE_CHECKING:  # the same names as `_LAZY`, for static tools
    from ._registry import SLOTS as SLOTS
    from ._registry import ComponentSpec as ComponentSpec
    from ._registry import DuplicateComponentError as DuplicateComponentError
    from ._registry import InvalidComponentError as InvalidComponentError
    from ._registry import Registry as Registry
    from ._registry import RegistryError as RegistryError
    from ._registry import Slot as Slot
    from ._registry import UnknownComponentError as UnknownComponentError
    from ._types import BIDIRECTIONAL as BIDIRECTIONAL
    from ._types import CAUSAL as CAUSAL
    from ._types import CONTINUOUS as CONTINUOUS
    from ._types import DISCRETE as DISCRETE
    from .backbones import BACKBONES as BACKBONES
    from .backbones import AbstractBackbone as AbstractBackbone
    from .backbones import AbstractCausalBackbone as AbstractCausalBackbone
    from .build import abstract_model as abstract_model
    from .build import build_model as build_model
    from .config import DataConfig as DataConfig
    from .config import MeshConfig as MeshConfig
    from .config import ModelConfig as ModelConfig
    from .config import OptimConfig as OptimConfig
    from .config import TokenizerLossConfig as TokenizerLossConfig
    from .config import TrainConfig as TrainConfig
    from .config import apply_overrides as apply_overrides
    from .heads import HEADS as HEADS
    from .heads import AbstractIterativeHead as AbstractIterativeHead
    from .heads import AbstractOutputHead as AbstractOutputHead
    from .model import FluidModel as FluidModel
    from .model import IncompatibleComponentsError as IncompatibleComponentsError
    from .orders import ORDERS as ORDERS
    from .pipeline import Pipeline as Pipeline
    from .pipeline import load as load
    from .orders import AbstractGenerationOrder as AbstractGenerationOrder
    from .presets import get_config as get_config
    from .text import CAPTION_TOKENIZERS as CAPTION_TOKENIZERS
    from .text import TEXT_ENCODERS as TEXT_ENCODERS
    from .text import AbstractCaptionTokenizer as AbstractCaptionTokenizer
    from .text import AbstractTextEncoder as AbstractTextEncoder
    from .tokenizers import TOKENIZERS as TOKENIZERS
    from .tokenizers import AbstractImageTokenizer as AbstractImageTokenizer

# Public name -> the module it comes from, imported when the name is first read.
_LAZY = {
    **dict.fromkeys(
        ["SLOTS", "Slot", "ComponentSpec", "Registry", "RegistryError", "UnknownComponentError",
         "DuplicateComponentError", "InvalidComponentError"],
        "fluid._registry",
    ),
    **dict.fromkeys(["CONTINUOUS", "DISCRETE", "CAUSAL", "BIDIRECTIONAL"], "fluid._types"),
    **dict.fromkeys(["BACKBONES", "AbstractBackbone", "AbstractCausalBackbone"],
                    "fluid.backbones"),
    **dict.fromkeys(["build_model", "abstract_model"], "fluid.build"),
    **dict.fromkeys(
        ["ModelConfig", "DataConfig", "OptimConfig", "MeshConfig", "TokenizerLossConfig",
         "TrainConfig", "apply_overrides"],
        "fluid.config",
    ),
    **dict.fromkeys(["HEADS", "AbstractOutputHead", "AbstractIterativeHead"], "fluid.heads"),
    **dict.fromkeys(["FluidModel", "IncompatibleComponentsError"], "fluid.model"),
    **dict.fromkeys(["ORDERS", "AbstractGenerationOrder"], "fluid.orders"),
    "get_config": "fluid.presets",
    "load": "fluid.pipeline",
    "Pipeline": "fluid.pipeline",
    **dict.fromkeys(
        ["TEXT_ENCODERS", "CAPTION_TOKENIZERS", "AbstractTextEncoder", "AbstractCaptionTokenizer"],
        "fluid.text",
    ),
    **dict.fromkeys(["TOKENIZERS", "AbstractImageTokenizer"], "fluid.tokenizers"),
}

# The errors above and every name of `_LAZY` (tests/test_api.py holds the lists equal).
__all__ = [
    "BACKBONES",
    "BIDIRECTIONAL",
    "CAPTION_TOKENIZERS",
    "CAUSAL",
    "CONTINUOUS",
    "DISCRETE",
    "HEADS",
    "ORDERS",
    "SLOTS",
    "TEXT_ENCODERS",
    "TOKENIZERS",
    "AbstractBackbone",
    "AbstractCaptionTokenizer",
    "AbstractCausalBackbone",
    "AbstractGenerationOrder",
    "AbstractImageTokenizer",
    "AbstractIterativeHead",
    "AbstractOutputHead",
    "AbstractTextEncoder",
    "ComponentSpec",
    "ConfigError",
    "ConfigKeyError",
    "ConfigTypeError",
    "DataConfig",
    "DuplicateComponentError",
    "FluidModel",
    "IncompatibleComponentsError",
    "InvalidComponentError",
    "MeshConfig",
    "MissingInputError",
    "ModelConfig",
    "OptimConfig",
    "Pipeline",
    "Registry",
    "RegistryError",
    "Slot",
    "TokenizerLossConfig",
    "TrainConfig",
    "TrainingDiverged",
    "UnknownComponentError",
    "UserError",
    "abstract_model",
    "apply_overrides",
    "build_model",
    "get_config",
    "load",
]

__version__ = "0.1.0"


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fluid' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # read once; later reads are ordinary attribute lookups
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
