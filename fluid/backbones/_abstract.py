import abc
from typing import Any

import equinox as eqx
from jaxtyping import Array, Bool, Float, Int

from .._types import Context, TextMask


class AbstractBackbone(eqx.Module):
    """Maps the known tokens of one example and a text context to one condition per position.

    Inputs are token embeddings (`FluidModel` embeds discrete codes or projects continuous
    tokens to `dim`), a mask of which positions are known, and the aligned text context that
    every block cross-attends to. Output `z[t]` is the condition from which the head predicts
    the token at position `t`.

    Information flow, which the semantics tests check:

    - `z` never depends on `x[s]` where `known[s]` is False (unknown inputs are replaced by
      a learned mask embedding before anything reads them);
    - with `attention == "causal"`, `z[t]` depends only on `x[s]` for `s < t` (the backbone
      shifts its input right by one, starting from a learned start embedding).
    """

    attention: eqx.AbstractClassVar[str]
    dim: eqx.AbstractVar[int]
    seq_len: eqx.AbstractVar[int]

    @abc.abstractmethod
    def __call__(
        self,
        x: Float[Array, "seq dim"],
        known: Bool[Array, " seq"],
        context: Context,
        context_mask: TextMask,
    ) -> Float[Array, "seq dim"]:
        """Condition vectors for every position.

        **Arguments:**

        - `x`: token embeddings at their grid positions (positional embeddings are the
          backbone's own business).
        - `known`: which positions may be read.
        - `context`: `Float[Array, "ctx dim"]`, the aligned text.
        - `context_mask`: `Bool[Array, " ctx"]`, True at real (non-padding) text tokens; at
          least one is True.

        **Returns:**

        `Float[Array, "seq dim"]`, one condition vector per position.
        """

    def at_positions(
        self,
        x: Float[Array, "seq dim"],
        known: Bool[Array, " seq"],
        context: Context,
        context_mask: TextMask,
        positions: Int[Array, " k"],
    ) -> Float[Array, "k dim"]:
        """The condition vectors at `positions` only, in their order: `self(x, known,
        context, context_mask)[positions]`, which is what this default computes.

        Random-order sampling needs the conditions of the few positions it produces at each
        step; a backbone that can skip work for the other positions overrides this (the
        bidirectional transformer runs its last block on `positions` alone).
        """
        return self(x, known, context, context_mask)[positions]


class AbstractCausalBackbone(AbstractBackbone):
    """A causal backbone that also decodes one position at a time from an explicit KV cache.

    Decoding positions `0, 1, ..., t` with `decode_step` gives the same `z[t]` as
    `__call__` on the full sequence with every position known.
    """

    @abc.abstractmethod
    def init_cache(self, context: Context, context_mask: TextMask) -> Any:
        """An empty cache for one example (a pytree of arrays with static shapes)."""

    @abc.abstractmethod
    def decode_step(
        self,
        x_prev: Float[Array, " dim"],
        t: Int[Array, ""],
        cache: Any,
        context: Context,
        context_mask: TextMask,
    ) -> tuple[Float[Array, " dim"], Any]:
        """The condition for position `t`, given the embedding of the token at `t - 1`.

        `x_prev` is ignored at `t == 0` (the start embedding is used). Returns `z[t]` and
        the cache with position `t`'s keys and values written.
        """
