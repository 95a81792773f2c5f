import abc
import typing
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .._types import Context, TextMask

# The embedding of one token (discrete id or continuous vector) in the backbone's width, as
# `FluidModel` embeds its tokens; decoding calls it on the tokens produced so far.
Embed = Callable[[Array], Float[Array, " dim"]]


class AbstractBackbone(eqx.Module):
    """Maps the known tokens of one example and a text context to one condition per position.

    Inputs are token embeddings (`FluidModel` embeds discrete codes or projects continuous
    tokens to `dim`), a mask of which positions are known, the order in which positions are
    produced, and the aligned text context that every block cross-attends to. Output `z[t]`
    is the condition from which the head predicts the token at position `t`.

    Information flow, which the semantics tests check:

    - `z` never depends on `x[s]` where `known[s]` is False;
    - with `attention == "causal"`, `z[order[j]]` depends only on `x[order[i]]` for `i < j`.

    Sampling goes through `init_decode`, `decode` and `observe`, the same calls for every
    backbone: `FluidModel` asks for the conditions at the positions the order produces at
    each step (`decode`), samples their tokens, writes them, and tells the backbone
    (`observe`) before the next step. `AbstractCausalBackbone` and
    `AbstractBidirectionalBackbone` implement these for the two kinds of attention.

    `parallel_decode` says whether `decode` takes several positions at one step (an order
    that produces several, such as the random order's cosine schedule); `FluidModel` refuses
    to sample such an order with a backbone that cannot, naming those that can.

    `context_state` says whether the decoding state holds something per context (a KV cache
    per caption) that every step must extend under every context. Without it (False), a
    step whose unconditional pass nothing reads (outside a `cfg_interval`) decodes under
    the caption's context alone. True, the default, is always correct.
    """

    attention: eqx.AbstractClassVar[str]
    parallel_decode: typing.ClassVar[bool] = True
    context_state: typing.ClassVar[bool] = True
    dim: eqx.AbstractVar[int]
    seq_len: eqx.AbstractVar[int]

    @abc.abstractmethod
    def __call__(
        self,
        x: Float[Array, "seq dim"],
        known: Bool[Array, " seq"],
        context: Context,
        context_mask: TextMask,
        *,
        order: Int[Array, " seq"] | None = None,
    ) -> Float[Array, "seq dim"]:
        """Condition vectors for every position.

        **Arguments:**

        - `x`: token embeddings at their grid positions (positional embeddings are the
          backbone's own business).
        - `known`: which positions may be read.
        - `context`: `Float[Array, "ctx dim"]`, the aligned text.
        - `context_mask`: `Bool[Array, " ctx"]`, True at real (non-padding) text tokens; at
          least one is True.
        - `order`: the permutation in which positions are produced; `None` is row-major
          (`arange(seq)`). A causal backbone reads, for `order[j]`, the positions
          `order[:j]`; a bidirectional one reads the known positions in any order.

        **Returns:**

        `Float[Array, "seq dim"]`, one condition vector per position.

        A backbone may take two more keyword arguments, which `FluidModel.loss_terms` passes
        in training only when its `__call__` names them: `key` (randomness, such as
        dropout; never passed in sampling or validation) and `max_known` (a static int: at
        most this many positions are known, from the order's `AbstractBoundedOrder` bound,
        or `seq` when the known counts are given).
        """

    @abc.abstractmethod
    def init_decode(
        self, contexts: Float[Array, "c ctx dim"], context_masks: Bool[Array, "c ctx"]
    ) -> Any:
        """The decoding state of one example before any token is produced, under `c`
        contexts at once (the caption, and the empty caption when guidance is on)."""

    @abc.abstractmethod
    def decode(
        self,
        state: Any,
        tokens: Array,
        embed: Embed,
        positions: Int[Array, " k"],
        contexts: Float[Array, "c ctx dim"],
        context_masks: Bool[Array, "c ctx"],
    ) -> tuple[Float[Array, "c k dim"], Any]:
        """The conditions at `positions`, the positions produced at this step, under each
        context; and the state for the next step, at which these positions count as known.

        **Arguments:**

        - `state`: from `init_decode` or the previous `decode`.
        - `tokens`: every position's token (`Int[seq]` or `Float[seq token_dim]`), holding
          the tokens produced at earlier steps; the others hold zeros.
        - `embed`: the embedding of one token, as in training.
        - `positions`: the positions produced at this step, in order; their number is
          static. A backbone that produces fewer positions per step raises `ValueError`.
        - `contexts`, `context_masks`: as given to `init_decode`.
        """

    def observe(
        self,
        state: Any,
        tokens: Array,
        embed: Embed,
        positions: Int[Array, " k"],
        contexts: Float[Array, "c ctx dim"],
        context_masks: Bool[Array, "c ctx"],
    ) -> Any:
        """The state after this step's tokens were written: `tokens` now holds them at
        `positions` (the positions `decode` was just given). Arguments as `decode`'s.

        The default returns `state` as it is, for a backbone whose `decode` reads what it
        needs from `tokens` (every position at each step, or the previous step's token).
        A backbone that caches what it has read appends the new tokens here.
        """
        del tokens, embed, positions, contexts, context_masks
        return state


class AbstractBidirectionalBackbone(AbstractBackbone):
    """A backbone that reads the known positions in any order, and at sampling re-reads
    every token produced so far at each step (MaskGIT, MAR). Its decoding state is which
    positions are known, the same under every context (`context_state` is False)."""

    context_state: typing.ClassVar[bool] = False

    @abc.abstractmethod
    def at_positions(
        self,
        x: Float[Array, "seq dim"],
        known: Bool[Array, " seq"],
        context: Context,
        context_mask: TextMask,
        positions: Int[Array, " k"],
    ) -> Float[Array, "k dim"]:
        """The condition vectors at `positions` only, in their order: `self(x, known,
        context, context_mask)[positions]` (which is a correct implementation).

        Random-order sampling needs the conditions of the few positions it produces at each
        step; a backbone can skip work for the other positions (the bidirectional
        transformer runs its last block on `positions` alone).
        """

    def init_decode(self, contexts, context_masks) -> Bool[Array, " seq"]:
        del contexts, context_masks
        return jnp.zeros((self.seq_len,), bool)  # which positions are known

    def decode(self, state, tokens, embed, positions, contexts, context_masks):
        known = state
        x = jax.vmap(embed)(tokens)
        z = jax.vmap(self.at_positions, in_axes=(None, None, 0, 0, None))(
            x, known, contexts, context_masks, positions
        )
        return z, known.at[positions].set(True)


class CausalDecodeState(eqx.Module):
    """Where cached decoding stands: the cache of each context, the step, and the position
    produced at the previous step (whose token is read next)."""

    cache: Any
    step: Int[Array, ""]
    last: Int[Array, ""]


class AbstractCausalBackbone(AbstractBackbone):
    """A causal backbone that also decodes one position at a time from an explicit KV cache.

    Decoding `order[0], order[1], ..., order[t]` with `decode_step` gives the same
    `z[order[t]]` as `__call__` on the full sequence with that `order` and every position
    known. It decodes one position per step (`parallel_decode` is False).
    """

    parallel_decode: typing.ClassVar[bool] = False

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
        *,
        position: Int[Array, ""] | None = None,
    ) -> tuple[Float[Array, " dim"], Any]:
        """The condition for step `t`, given the embedding of the token produced at step
        `t - 1`.

        `x_prev` is ignored at `t == 0` (the start embedding is used). `position` is the
        grid position produced at step `t` (`order[t]`; `None` is `t`, row-major). Returns
        its condition and the cache with step `t`'s keys and values written.
        """

    def init_decode(self, contexts, context_masks) -> CausalDecodeState:
        cache = jax.vmap(self.init_cache)(contexts, context_masks)
        zero = jnp.zeros((), jnp.int32)
        return CausalDecodeState(cache, zero, zero)

    def decode(self, state, tokens, embed, positions, contexts, context_masks):
        if positions.shape != (1,):
            raise ValueError(
                f"{type(self).__name__} decodes one position per step, but the order produces "
                f"{positions.shape[0]} at a step; use an order that produces one position per "
                "step (raster), or a bidirectional backbone."
            )
        position = positions[0]
        x_prev = embed(tokens[state.last])  # ignored at step 0
        z, cache = jax.vmap(
            lambda cache, c, m: self.decode_step(x_prev, state.step, cache, c, m, position=position)
        )(state.cache, contexts, context_masks)
        return z[:, None], CausalDecodeState(cache, state.step + 1, position)
