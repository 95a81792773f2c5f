"""Image tokenizers: images to tokens and back."""

from .._registry import Registry
from ._abstract import AbstractImageTokenizer as AbstractImageTokenizer

TOKENIZERS: Registry = Registry("image tokenizer", AbstractImageTokenizer, "fluid.tokenizers")

from ._kl import KLTokenizer as KLTokenizer  # noqa: E402
from ._losses import gaussian_kl as gaussian_kl  # noqa: E402
from ._losses import kl_autoencoder_loss as kl_autoencoder_loss  # noqa: E402
from ._losses import reconstruction_loss as reconstruction_loss  # noqa: E402
from ._losses import vq_autoencoder_loss as vq_autoencoder_loss  # noqa: E402
from ._objective import AutoencoderObjective as AutoencoderObjective  # noqa: E402
from ._objective import psnr as psnr  # noqa: E402
from ._palette import PaletteTokenizer as PaletteTokenizer  # noqa: E402
from ._patch import PatchTokenizer as PatchTokenizer  # noqa: E402
from ._vq import VQTokenizer as VQTokenizer  # noqa: E402

TOKENIZERS.register("patch", PatchTokenizer)
TOKENIZERS.register("palette", PaletteTokenizer)
TOKENIZERS.register("kl", KLTokenizer)
TOKENIZERS.register("vq", VQTokenizer)
