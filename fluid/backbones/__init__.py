"""Backbones: known tokens and text context to one condition vector per position."""

from .._registry import Registry
from ._abstract import AbstractBackbone as AbstractBackbone
from ._abstract import AbstractBidirectionalBackbone as AbstractBidirectionalBackbone
from ._abstract import AbstractCausalBackbone as AbstractCausalBackbone
from ._abstract import CausalDecodeState as CausalDecodeState
from ._abstract import Embed as Embed

BACKBONES: Registry = Registry("backbone", AbstractBackbone, "fluid.backbones")

from ._arpg import ArpgDecodeState as ArpgDecodeState
from ._arpg import ArpgTransformer as ArpgTransformer
from ._arpg import QueryBlock as QueryBlock
from ._bidirectional import BidirectionalTransformer as BidirectionalTransformer  # noqa: E402
from ._causal import CausalTransformer as CausalTransformer  # noqa: E402
from ._mae import MaskedAutoencoder as MaskedAutoencoder  # noqa: E402
from ._mar_convert import load_mar_backbone as load_mar_backbone  # noqa: E402

BACKBONES.register("causal", CausalTransformer)
BACKBONES.register("bidirectional", BidirectionalTransformer)
BACKBONES.register("mae", MaskedAutoencoder)
BACKBONES.register("arpg", ArpgTransformer)
