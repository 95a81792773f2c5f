"""Output heads: a loss against the target token, or a sampled token, from a condition."""

from .._registry import Registry
from ._abstract import AbstractIterativeHead as AbstractIterativeHead
from ._abstract import AbstractOutputHead as AbstractOutputHead

HEADS: Registry = Registry("output head", AbstractOutputHead, "fluid.heads")

from ._diffusion import DiffusionHead as DiffusionHead  # noqa: E402
from ._flow import FlowHead as FlowHead  # noqa: E402
from ._mar_convert import MarCheckpointError as MarCheckpointError  # noqa: E402
from ._mar_convert import load_mar_diffloss as load_mar_diffloss  # noqa: E402
from ._softmax import SoftmaxHead as SoftmaxHead  # noqa: E402
from ._steps import annealed_steps as annealed_steps  # noqa: E402
from ._steps import as_progress_steps as as_progress_steps  # noqa: E402
from ._steps import progress_level as progress_level  # noqa: E402

HEADS.register("softmax", SoftmaxHead)
HEADS.register("diffusion", DiffusionHead)
HEADS.register("flow", FlowHead)
