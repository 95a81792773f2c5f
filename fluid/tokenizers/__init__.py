"""Image tokenizers: images to tokens and back."""

from .._registry import Registry
from ._abstract import AbstractImageTokenizer as AbstractImageTokenizer

TOKENIZERS: Registry = Registry("image tokenizer", AbstractImageTokenizer, "fluid.tokenizers")

from ._palette import PaletteTokenizer as PaletteTokenizer  # noqa: E402
from ._patch import PatchTokenizer as PatchTokenizer  # noqa: E402

TOKENIZERS.register("patch", PatchTokenizer)
TOKENIZERS.register("palette", PaletteTokenizer)
