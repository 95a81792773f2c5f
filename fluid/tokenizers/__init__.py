"""Image tokenizers: images to tokens and back."""

from .._registry import Registry
from ._abstract import AbstractImageTokenizer as AbstractImageTokenizer

TOKENIZERS: Registry = Registry("image tokenizer", AbstractImageTokenizer, "fluid.tokenizers")

from ._kl import MAR_KL16 as MAR_KL16  # noqa: E402
from ._kl import MAR_SCALING_FACTOR as MAR_SCALING_FACTOR  # noqa: E402
from ._kl import KLTokenizer as KLTokenizer  # noqa: E402
from ._kl import draw_posterior_tokens as draw_posterior_tokens  # noqa: E402
from ._kl import read_kl_config as read_kl_config  # noqa: E402
from ._ldm import ConvertedCheckpoint as ConvertedCheckpoint  # noqa: E402
from ._ldm import convert_ldm_checkpoint as convert_ldm_checkpoint  # noqa: E402
from ._ldm import ldm_to_diffusers as ldm_to_diffusers  # noqa: E402
from ._ldm import read_torch_checkpoint as read_torch_checkpoint  # noqa: E402
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
