"""Generation orders: which positions are known in training, produced in sampling."""

from .._registry import Registry
from ._abstract import AbstractBoundedOrder as AbstractBoundedOrder
from ._abstract import AbstractGenerationOrder as AbstractGenerationOrder
from ._abstract import TrainingPositions as TrainingPositions

ORDERS: Registry = Registry("generation order", AbstractGenerationOrder, "fluid.orders")

from ._random import RandomOrder as RandomOrder  # noqa: E402
from ._random import cosine_step_counts as cosine_step_counts  # noqa: E402
from ._raster import RasterOrder as RasterOrder  # noqa: E402

ORDERS.register("raster", RasterOrder)
ORDERS.register("random", RandomOrder)
