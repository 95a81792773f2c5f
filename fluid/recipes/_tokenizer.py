"""Training an image tokenizer alone, as an autoencoder, on images without captions."""

import functools
import json

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ..build import build_objective
from ..run import RunFolder
from ..tokenizers import psnr
from ..train import ModelLossTerms
from .. import viz
from ._data import fit_images
from ._recipe import Recipe

# Held-out images of a tokenizer run's PSNR: a steady estimate for the cost of a forward
# pass over a few training batches.
EVAL_IMAGES = 64

_psnr = jax.jit(psnr)


class TokenizerRecipe(Recipe):
    """`task="tokenizer"`: the image tokenizer `config.model.tokenizer` alone, trained as an
    autoencoder (`AutoencoderObjective`, loss `config.tokenizer_loss`) on images without
    captions; every floating-point leaf trains and nothing is cast. It logs the `psnr` of
    held-out reconstructions and saves the tokenizer as a diffusers folder, `tokenizer/`
    (`save_pretrained`: the `kl`/`vq` spec's `path`, and diffusers, read it)."""

    name = "tokenizer"
    reads_captions = False
    _held_out: jax.Array | None = None

    def builder(self, *, key):
        config = self.config
        return functools.partial(
            build_objective, config.model.tokenizer, config.tokenizer_loss, key=key
        )

    @classmethod
    def abstract_model(cls, config, *, source=None):
        del source
        return eqx.filter_eval_shape(
            build_objective, config.model.tokenizer, config.tokenizer_loss, key=jr.key(0)
        )

    def objective(self):
        return ModelLossTerms()

    def held_out_images(self) -> jax.Array:
        """The fixed images that `evaluate` and `sample_grid` use, replicated on the mesh:
        the `EVAL_IMAGES` items of `fit_images`, from the far end of the unbounded built-in
        data set (a shuffled order of 2**31 items, of which a run reads a vanishing
        fraction); from a finite source or files, its first readable items, which training
        reads too."""
        if self._held_out is None:
            images = fit_images(self.source, EVAL_IMAGES)
            self._held_out = jax.device_put(images, NamedSharding(self.mesh, PartitionSpec()))
        return self._held_out

    def evaluate(self):
        """`psnr` (dB, see `fluid.tokenizers.psnr`) of the EMA model's deterministic
        reconstructions of `held_out_images()`."""
        images = self.held_out_images()
        return {"psnr": float(_psnr(images, self.model(ema=True).reconstruct(images)))}

    def sample_grid(self, prompts=None, *, path=None):
        """8 held-out images above their reconstructions."""
        del prompts
        if path is None:
            if self.folder is None:
                return None
            path = self.folder.sample_grid(self.step)
        images = self.held_out_images()
        # All of them, as `evaluate` does (one compiled program), then the first 8.
        pairs = (images, self.model(ema=True).reconstruct(images))
        if not self.is_main:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        grid = np.concatenate([np.asarray(x)[:8] for x in pairs])
        return viz.save_grid(grid, path, cols=8)

    def write_model(self, model, directory):
        # `fluid.run.load_model` refuses this run, naming this folder instead.
        model.autoencoder.save_pretrained(RunFolder(directory).tokenizer)

    def describe(self):
        return f"the {self.config.model.tokenizer.name} tokenizer for {super().describe()}"

    def closing_lines(self, summary):
        config, tokenizer = self.config, self.folder.tokenizer
        spec = json.dumps({"name": config.model.tokenizer.name,
                           "kwargs": {"path": str(tokenizer),
                                      "image_size": config.data.image_size}})
        return [
            f"\nPSNR {summary['psnr']:.2f} dB on held-out images after {summary['steps']} steps",
            f"tokenizer: {tokenizer} (diffusers format; use it as model.tokenizer='{spec}')",
        ]

    def report(self):
        return {
            "psnr": self.evaluate()["psnr"],
            "reconstructions": str(self.sample_grid()),
            "tokenizer": str(self.folder.tokenizer),
        }
