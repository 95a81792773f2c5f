import typing

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jaxtyping import Array, Float, Int

from .._types import DISCRETE, Condition, Key, Scalar
from ..nn import dense
from ._abstract import AbstractOutputHead


@typing.final
class SoftmaxHead(AbstractOutputHead):
    """Cross-entropy over a discrete codebook: LayerNorm then a linear map to logits.

    Guidance mixes logits, `uncond + cfg * (cond - uncond)`; the temperature divides the
    mixed logits; `top_k` (static) keeps only the k largest logits before sampling.

    **Arguments:**

    - `cond_dim`: width of the condition vector.
    - `vocab_size`: size of the tokenizer's codebook.
    - `top_k`: sample among the `top_k` most likely codes only; `None` for all.
    - `key`: initialisation key.
    """

    token_kind: typing.ClassVar[str] = DISCRETE
    norm: eqx.nn.LayerNorm
    proj: eqx.nn.Linear
    cond_dim: int = eqx.field(static=True)
    vocab_size: int = eqx.field(static=True)
    top_k: int | None = eqx.field(static=True)

    def __init__(self, cond_dim: int, vocab_size: int, top_k: int | None = None, *, key: Key):
        if top_k is not None and not 0 < top_k <= vocab_size:
            raise ValueError(f"top_k must lie in [1, vocab_size={vocab_size}], got {top_k}.")
        self.cond_dim = cond_dim
        self.vocab_size = vocab_size
        self.top_k = top_k
        self.norm = eqx.nn.LayerNorm(cond_dim)
        proj = eqx.nn.Linear(cond_dim, vocab_size, key=key)
        init = jax.nn.initializers.xavier_uniform()
        self.proj = eqx.tree_at(
            lambda p: (p.weight, p.bias),
            proj,
            (init(key, (vocab_size, cond_dim)), jnp.zeros((vocab_size,))),
        )

    def logits(self, z: Condition) -> Float[Array, " vocab"]:
        """Unnormalised log-probabilities of every code."""
        return dense(self.proj, self.norm(z)).astype(jnp.float32)

    def loss(self, z: Condition, target: Int[Array, ""], *, key: Key) -> Scalar:
        del key
        return optax.softmax_cross_entropy_with_integer_labels(self.logits(z), target)

    def sample(
        self,
        z: Condition,
        z_uncond: Condition | None,
        cfg: Float[Array, ""] | float,
        temperature: Float[Array, ""] | float,
        *,
        key: Key,
    ) -> Int[Array, ""]:
        logits = self.logits(z)
        if z_uncond is not None:
            uncond = self.logits(z_uncond)
            # = uncond + cfg * (cond - uncond), exactly the conditional logits at cfg == 1
            logits = logits + (jnp.asarray(cfg, jnp.float32) - 1) * (logits - uncond)
        # A temperature of zero means greedy decoding; the floor keeps the division finite.
        logits = logits / jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
        if self.top_k is not None:
            kth = jax.lax.top_k(logits, self.top_k)[0][-1]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jr.categorical(key, logits).astype(jnp.int32)

    def num_evaluations(self) -> int:
        return 1
