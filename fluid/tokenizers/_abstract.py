import abc

import equinox as eqx
import numpy as np
from jaxtyping import Array, Float

from .._types import Image, Key, Tokens


class AbstractImageTokenizer(eqx.Module):
    """Maps one image to a grid of tokens and back.

    A tokenizer declares the kind of its tokens (`token_kind`, `"continuous"` or
    `"discrete"`), its token grid and either the channels of a continuous token
    (`token_dim`) or the size of a discrete codebook (`vocab_size`). Tokens are laid out
    row-major over the grid, so position `i` is grid cell `(i // grid[1], i % grid[1])`.

    Tokenizers are frozen inside a `FluidModel`: the model wraps their outputs in
    `jax.lax.stop_gradient` and the trainer excludes their parameters from the optimiser.
    """

    token_kind: eqx.AbstractClassVar[str]
    image_size: eqx.AbstractVar[int]
    grid: eqx.AbstractVar[tuple[int, int]]
    token_dim: eqx.AbstractVar[int]
    vocab_size: eqx.AbstractVar[int | None]

    @property
    def seq_len(self) -> int:
        """Number of tokens per image, `grid[0] * grid[1]`."""
        return self.grid[0] * self.grid[1]

    @abc.abstractmethod
    def encode(self, image: Image) -> Tokens:
        """Tokenize one image.

        **Arguments:**

        - `image`: `Float[Array, "h w 3"]` with `h == w == image_size`, values in [-1, 1].

        **Returns:**

        `Float[Array, "seq token_dim"]` for continuous tokenizers, `Int[Array, " seq"]` with
        values in `[0, vocab_size)` for discrete ones. Deterministic (a KL tokenizer returns
        its posterior mean or a sample drawn by the caller's own means).
        """

    @abc.abstractmethod
    def decode(self, tokens: Tokens) -> Image:
        """Turn tokens (as `encode` returns them) back into one image in [-1, 1]."""

    # -- training on posterior draws (optional) ------------------------------------------
    # A tokenizer with a distribution over tokens per image (a KL autoencoder's Gaussian
    # posterior) may have the model train on a fresh draw every step, as MAR does, instead of
    # on `encode`'s deterministic tokens. It says so with `samples_posterior` and implements
    # the four methods below; the model (`FluidModel.samples_posterior`) and the token cache
    # (`fluid.recipes.build_cache`) ask it, never its class.

    @property
    def samples_posterior(self) -> bool:
        """Whether a model trains on tokens drawn from this tokenizer's posterior (`False`:
        on `encode`'s tokens, and the four methods below are not needed)."""
        return False

    def _no_posterior(self, method: str) -> NotImplementedError:
        return NotImplementedError(
            f"{type(self).__name__} does not sample a posterior (samples_posterior is False), "
            f"so it has no {method}: a tokenizer that does implements samples_posterior, "
            "sample_tokens, mean_tokens, posterior_moments and draw_tokens."
        )

    def sample_tokens(self, image: Image, *, key: Key) -> Tokens:
        """Tokens of one image drawn from its posterior with `key` (training without a
        token cache)."""
        raise self._no_posterior("sample_tokens")

    def mean_tokens(self, image: Image) -> Tokens:
        """Tokens of the posterior's most likely value for one image, with no draw (what
        validation scores a model that trains on draws with)."""
        raise self._no_posterior("mean_tokens")

    def posterior_moments(self, image: Image, views: int) -> Float[Array, "views ..."]:
        """What a token cache stores of one image so that `draw_tokens` can draw fresh
        tokens from it every step: the posterior's parameters of the image (`views=1`), or
        of the image and its horizontal flip (`views=2`, for data read with flips), stacked
        on a leading axis."""
        raise self._no_posterior("posterior_moments")

    def draw_tokens(self, moments: Float[Array, "views ..."], *, key: Key) -> Tokens:
        """Tokens drawn with `key` from the posterior of one of the views of `moments` (as
        `posterior_moments` gives them), the view picked uniformly with the same key."""
        raise self._no_posterior("draw_tokens")

    @abc.abstractmethod
    def fit(self, images: np.ndarray, *, key: Key) -> "AbstractImageTokenizer":
        """Adapt the tokenizer to data, once, before a model is trained on its tokens.

        A tokenizer whose tokens depend on the data (a codebook fitted by k-means, say)
        computes them here; the model and trainer then treat it as frozen. Tokenizers that
        need no fitting return `self`.

        **Arguments:**

        - `images`: `[n, h, w, 3]` host images (NumPy, float32) in [-1, 1] with
          `h == w == image_size`.
        - `key`: randomness of the fitting procedure (initialisation, sampling).

        **Returns:**

        A new tokenizer of the same class and token grid, fitted to `images`; `self` is left
        unchanged.
        """
