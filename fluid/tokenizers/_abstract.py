import abc

import equinox as eqx
import numpy as np

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
