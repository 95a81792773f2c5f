"""fluid: autoregressive text-to-image generation (Fluid, MAR) as composable JAX components."""

from ._errors import ConfigError as ConfigError
from ._errors import ConfigKeyError as ConfigKeyError
from ._errors import ConfigTypeError as ConfigTypeError
from ._errors import MissingInputError as MissingInputError
from ._errors import TrainingDiverged as TrainingDiverged
from ._errors import UserError as UserError

__version__ = "0.1.0"
