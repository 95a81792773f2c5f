"""`FluidModel`: one tokenizer, text encoder, backbone, head and order, composed and batched."""

import functools
import inspect
import itertools
import typing
from collections.abc import Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jaxtyping
import numpy as np
from jax.typing import ArrayLike
from jaxtyping import Array, Bool, Float, Int

from ._errors import ConfigError
from ._types import CONTINUOUS, DISCRETE, Context, Key, TextMask, Tokens
from .backbones import (
    BACKBONES,
    AbstractBackbone,
    AbstractBidirectionalBackbone,
    AbstractCausalBackbone,
)
from .heads import (
    HEADS,
    AbstractIterativeHead,
    AbstractOutputHead,
    as_progress_steps,
    progress_level,
)
from .nn import dense, per_vector
from .orders import ORDERS, AbstractBoundedOrder, AbstractGenerationOrder
from .text import AbstractTextEncoder, TextAligner
from .tokenizers import AbstractImageTokenizer

CFG_SCHEDULES = ("linear", "constant")


def sampling_switches(
    head: AbstractOutputHead,
    *,
    cfg: float,
    negative: bool = False,
    cfg_interval: Sequence[float] | None = None,
    head_steps: int | np.integer | Sequence[int] | None = None,
    cfg_refresh: int | np.integer | None = None,
    backbone: AbstractBackbone | None = None,
) -> tuple[tuple[float, float] | None, int | tuple[int, ...] | None, int | None]:
    """The sampling settings beyond steps and scale, checked against a model's head,
    backbone and guidance scale, as `FluidModel.generate` takes them (hashable, so static
    under jit): `(cfg_interval, head_steps, cfg_refresh)`. Every entry point (the model,
    `fluid.sample`, the CLI, `fluid eval`, the server) asks this one function, so a setting
    is refused the same way everywhere, before anything runs.

    `cfg_refresh` is a no-op without guidance (`cfg == 1`: there is no unconditional pass
    to skip), as a `cfg_interval` is: it comes back `None`. `backbone`: the model's, which
    `cfg_refresh` above 1 needs to be bidirectional (checked only when given).

    **Raises:**

    `ConfigError` (a `ValueError`) saying what to change, for a negative prompt without
    guidance (`cfg == 1`), a `cfg_interval` outside `0 <= lo <= hi <= 1`, `head_steps`
    for a head that samples in one evaluation, a `cfg_refresh` that is not an integer
    `>= 1`, or a `cfg_refresh` above 1 with a backbone that keeps a cache per context.
    """
    if negative and cfg == 1.0:
        raise ConfigError(
            "a negative prompt acts through guidance (the unconditional half reads it), which "
            "cfg=1 turns off: set cfg above 1, or leave the negative prompt out."
        )
    if cfg_interval is not None:
        lo, hi = (float(v) for v in cfg_interval)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(
                f"cfg_interval (--cfg-interval) must be (lo, hi) with 0 <= lo <= hi <= 1: the "
                f"part of the generation, by tokens produced, that is guided; got {lo:g}, {hi:g}."
            )
        cfg_interval = (lo, hi)
    if head_steps is not None:
        if not isinstance(head, AbstractIterativeHead):
            raise ConfigError(
                f"head_steps sets the chain of an iterative head (diffusion, flow); the head "
                f"{type(head).__name__} samples in one evaluation: leave head_steps "
                "(--head-steps) out."
            )
        head_steps = (int(head_steps) if np.ndim(head_steps) == 0
                      else tuple(int(s) for s in head_steps))
    if cfg_refresh is not None:
        if isinstance(cfg_refresh, bool | np.bool_) or not isinstance(
                cfg_refresh, int | np.integer) or cfg_refresh < 1:
            raise ConfigError(
                f"cfg_refresh (--cfg-refresh) must be an integer >= 1: the unconditional "
                f"backbone pass runs every that many guided steps (1: every step, plain "
                f"guidance); got {cfg_refresh!r}."
            )
        cfg_refresh = int(cfg_refresh) if cfg != 1.0 else None
    if (cfg_refresh or 1) > 1 and backbone is not None and not isinstance(
            backbone, AbstractBidirectionalBackbone):
        raise ConfigError(
            f"cfg_refresh skips the unconditional backbone pass between refreshes, which only "
            f"a bidirectional backbone (it re-reads every token at each step) can do; the "
            f"backbone {type(backbone).__name__} keeps a cache per context that the "
            "unconditional pass must extend at every step: leave cfg_refresh "
            "(--cfg-refresh) out, or set it to 1."
        )
    return cfg_interval, head_steps, cfg_refresh


def _float_dtype(module) -> jnp.dtype:
    """The dtype of a module's floating-point parameters (float32 if it has none)."""
    leaves = jax.tree.leaves(eqx.filter(module, eqx.is_inexact_array))
    return leaves[0].dtype if leaves else jnp.dtype(jnp.float32)


class IncompatibleComponentsError(ValueError):
    """Parts that cannot work together, with the parts that would fit."""


@typing.final
class TokenEmbedding(eqx.Module):
    """Embeds tokens for the backbone: a table for discrete codes, a linear map otherwise,
    then a LayerNorm unless `normalize` is False.

    **Arguments:**

    - `token_kind`: `"discrete"` or `"continuous"`.
    - `token_dim`: channels of a continuous token.
    - `vocab_size`: codes of a discrete token (`None` for continuous ones).
    - `dim`: the backbone's width.
    - `normalize`: whether a LayerNorm follows the map. MAR normalises after adding its
      buffer and position embeddings instead (the `mae` backbone's `input_norm`), so its
      compositions leave it out (`ModelConfig.token_norm`).
    - `key`: initialisation key.
    """

    layer: eqx.nn.Linear | eqx.nn.Embedding
    norm: eqx.nn.LayerNorm | None
    token_kind: str = eqx.field(static=True)

    def __init__(
        self,
        token_kind: str,
        token_dim: int,
        vocab_size: int | None,
        dim: int,
        normalize: bool = True,
        *,
        key: Key,
    ):
        self.token_kind = token_kind
        if token_kind == DISCRETE:
            assert vocab_size is not None
            self.layer = eqx.nn.Embedding(
                weight=0.02 * jr.normal(key, (vocab_size, dim))
            )
        else:
            self.layer = eqx.nn.Linear(token_dim, dim, key=key)
        self.norm = eqx.nn.LayerNorm(dim) if normalize else None

    def __call__(self, tokens: Tokens) -> Float[Array, "seq dim"]:
        return jax.vmap(self.embed_one)(tokens)

    def embed_one(self, token: Float[Array, " token_dim"] | Int[Array, ""]) -> Float[Array, " dim"]:
        layer = self.layer
        embedded = dense(layer, token) if isinstance(layer, eqx.nn.Linear) else layer(token)
        return embedded if self.norm is None else self.norm(embedded)


@functools.cache
def _call_keywords(backbone_type: type) -> frozenset[str]:
    """The arguments a backbone class's `__call__` names (the contract's optional `key` and
    `max_known` among them, or not)."""
    return frozenset(inspect.signature(backbone_type.__call__).parameters)


def _names_where(registry, predicate) -> list[str]:
    out = []
    for name in registry.names():
        try:
            if predicate(registry.get(name)):
                out.append(name)
        except Exception:  # a broken plug-in must not hide the real error
            continue
    return out


@typing.final
class FluidModel(eqx.Module):
    """A text-to-image model composed of one part of each kind; the only batched API.

    **Arguments:**

    - `tokenizer`: image tokenizer (frozen).
    - `text_encoder`: text encoder (frozen unless `text_encoder.trainable`).
    - `aligner`: trainable text aligner from the encoder's width to the backbone's.
    - `token_embedding`: embeds tokens into the backbone's width.
    - `backbone`, `head`, `order`: as their names say.
    - `null_text`: `(ids, mask)` of the empty caption, the unconditional input.
    - `caption_dropout`: probability of replacing a caption by the empty one in training.
    """

    tokenizer: AbstractImageTokenizer
    text_encoder: AbstractTextEncoder
    aligner: TextAligner
    token_embedding: TokenEmbedding
    backbone: AbstractBackbone
    head: AbstractOutputHead
    order: AbstractGenerationOrder
    null_ids: Int[Array, " ctx"]
    null_mask: Bool[Array, " ctx"]
    caption_dropout: float = eqx.field(static=True)

    def __init__(
        self,
        tokenizer: AbstractImageTokenizer,
        text_encoder: AbstractTextEncoder,
        aligner: TextAligner,
        token_embedding: TokenEmbedding,
        backbone: AbstractBackbone,
        head: AbstractOutputHead,
        order: AbstractGenerationOrder,
        null_text: tuple[ArrayLike, ArrayLike],
        caption_dropout: float = 0.1,
    ):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.aligner = aligner
        self.token_embedding = token_embedding
        self.backbone = backbone
        self.head = head
        self.order = order
        null_ids, null_mask = (np.asarray(a).reshape(-1) for a in null_text)
        if null_ids.shape != null_mask.shape or not null_mask.any():
            raise ValueError(
                "null_text must be (ids, mask) of one caption with at least one real token, "
                "as TextTokenizer.encode(['']) gives."
            )
        self.null_ids = jnp.asarray(null_ids, jnp.int32)
        self.null_mask = jnp.asarray(null_mask, bool)
        self.caption_dropout = caption_dropout

    def __check_init__(self):
        tok, head, backbone, order = self.tokenizer, self.head, self.backbone, self.order
        if head.token_kind != tok.token_kind:
            fits = _names_where(HEADS, lambda c: c.token_kind == tok.token_kind)
            raise IncompatibleComponentsError(
                f"the head {type(head).__name__} takes {head.token_kind} tokens but the "
                f"tokenizer {type(tok).__name__} makes {tok.token_kind} ones. Heads for "
                f"{tok.token_kind} tokens: {', '.join(fits) or 'none registered'}."
            )
        if backbone.attention not in order.supported_attention:
            backs = _names_where(BACKBONES, lambda c: c.attention in order.supported_attention)
            orders = _names_where(ORDERS, lambda c: backbone.attention in c.supported_attention)
            raise IncompatibleComponentsError(
                f"the order {type(order).__name__} supports "
                f"{sorted(order.supported_attention)} attention, but the backbone "
                f"{type(backbone).__name__} is {backbone.attention}. Backbones that fit this "
                f"order: {', '.join(backs) or 'none'}; orders that fit this backbone: "
                f"{', '.join(orders) or 'none'}."
            )
        for what, a, b in [
            ("head.cond_dim vs backbone.dim", head.cond_dim, backbone.dim),
            ("backbone.seq_len vs tokenizer.seq_len", backbone.seq_len, tok.seq_len),
            ("aligner.dim vs backbone.dim", self.aligner.dim, backbone.dim),
            ("aligner.in_dim vs text_encoder.dim", self.aligner.in_dim, self.text_encoder.dim),
        ]:
            if a != b:
                raise IncompatibleComponentsError(f"sizes do not fit: {what} = {a} vs {b}.")

    # -- pieces ---------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.tokenizer.seq_len

    @property
    def samples_posterior(self) -> bool:
        """Whether training draws its tokens from the tokenizer's posterior (its
        `samples_posterior`: a KL tokenizer with `sample_posterior`, say) rather than taking
        them as the tokenizer encodes them."""
        return self.tokenizer.samples_posterior

    def encode_images(
        self,
        images: Float[Array, "batch h w 3"],
        *,
        keys: jaxtyping.Key[Array, " batch"] | None = None,
    ) -> Float[Array, "batch seq token_dim"] | Int[Array, "batch seq"]:
        """Tokens of a batch of images (no gradient flows into the tokenizer). With a
        tokenizer that samples its posterior (`samples_posterior`), image `i`'s are drawn
        with `keys[i]`, or are of the posterior mean without `keys` (validation)."""
        with jax.named_scope("tokenizer"):
            if not self.samples_posterior:
                tokens = jax.vmap(self.tokenizer.encode)(images)
            elif keys is None:
                tokens = jax.vmap(self.tokenizer.mean_tokens)(images)
            else:
                tokens = jax.vmap(lambda x, k: self.tokenizer.sample_tokens(x, key=k))(images,
                                                                                     keys)
            return jax.lax.stop_gradient(tokens)

    def encode_text(self, ids: Int[Array, " ctx"], mask: TextMask) -> Context:
        """The aligned text context of one caption."""
        with jax.named_scope("text"):
            hidden = self.text_encoder(ids, mask)
            if not self.text_encoder.trainable:
                hidden = jax.lax.stop_gradient(hidden)
            return self.aligner(hidden, mask)

    # -- training -------------------------------------------------------------------------
    def loss(self, batch: Mapping[str, ArrayLike], *, key: Key) -> Float[Array, ""]:
        """Mean loss over the target positions of a batch.

        `batch` holds `text_ids` (`Int[batch ctx]`), `text_mask` (`Bool[batch ctx]`) and
        either `image` (`Float[batch h w 3]` in [-1, 1]), precomputed `tokens`, or, for a
        KL tokenizer with `sample_posterior`, cached `posterior` moments
        (`Float[batch pair 2 lh lw latent]`, drawn from per example); with a
        frozen text encoder, optionally its precomputed outputs `text_hidden`
        (`Float[batch ctx text_dim]`, a token cache's).
        """
        bsz = batch["text_ids"].shape[0]
        total, count = self.loss_terms(batch, keys=jr.split(key, bsz))
        return jnp.sum(total) / jnp.maximum(jnp.sum(count), 1.0)

    def loss_terms(
        self,
        batch: Mapping[str, ArrayLike],
        *,
        keys: jaxtyping.Key[Array, " batch"],
        num_known: Int[Array, " batch"] | None = None,
        dropout: bool = True,
    ) -> tuple[Float[Array, " batch"], Float[Array, " batch"]]:
        """Per example: the summed loss over its target positions, and how many there are.

        Every random choice of example `i` (caption dropout, order, known positions, the
        backbone's dropout, the head's noise) comes from `keys[i]` alone, so a batch split
        into micro-batches with the matching keys gives the same sums (gradient
        accumulation is exact), and `loss = sum(total) / sum(count)`.

        `num_known`, for a bidirectional backbone only: how many positions of each example
        (a prefix of its permutation, in `[0, seq - 1]`) are known, in place of the order's
        draw. Validation passes fixed counts, so that every model is measured at the same
        mask ratios (`fluid.eval.validation_loss`).

        `dropout` (static): whether a backbone whose `__call__` takes a `key` (the `mae`
        backbone: MAR's dropout) is given one; validation turns it off, as MAR evaluates
        in eval mode. Backbones without a `key` are unaffected.

        With an order that bounds its known counts (`AbstractBoundedOrder`, such as MAR's
        random order: at least 70% masked) and a backbone whose `__call__` takes
        `max_known` (the `mae` backbone), the backbone is told the bound, a static int, and
        its encoder runs over that many slots for the known tokens instead of `seq`. With
        `num_known` given, it is told `seq`.

        The backbone computes in the dtype of its parameters (cast them to bfloat16 for
        mixed precision); its inputs are cast to that dtype and its outputs back to float32,
        so the head and the loss stay in float32.
        """
        tokens, ids, mask, hidden, null_hidden = self._training_inputs(batch, keys)
        n = self.seq_len

        def one(tokens, ids, mask, hidden, key, known_count):
            k_drop, k_perm, k_known, k_head = jr.split(key, 4)
            z, at = self._training_example(tokens, ids, mask, hidden, null_hidden, key,
                                           (k_drop, k_perm, k_known), known_count, dropout)
            with jax.named_scope("head"):
                per_pos = jax.vmap(lambda zz, t, k: self.head.loss(zz, t, key=k))(
                    z, tokens, jr.split(k_head, n)
                )
            weights = at.targets.astype(jnp.float32)
            return jnp.sum(per_pos.astype(jnp.float32) * weights), jnp.sum(weights)

        return jax.vmap(one)(tokens, ids, mask, hidden, keys, num_known)

    def training_conditions(
        self,
        batch: Mapping[str, ArrayLike],
        *,
        keys: jaxtyping.Key[Array, " batch"],
        num_known: Int[Array, " batch"] | None = None,
        dropout: bool = True,
    ) -> tuple[Float[Array, "batch seq dim"], Bool[Array, "batch seq"]]:
        """What `loss_terms` gives the head, from the same batch, keys and arguments: the
        backbone's condition at every position (float32), and which positions the loss
        counts."""
        tokens, ids, mask, hidden, null_hidden = self._training_inputs(batch, keys)

        def one(tokens, ids, mask, hidden, key, known_count):
            k_drop, k_perm, k_known, _ = jr.split(key, 4)
            z, at = self._training_example(tokens, ids, mask, hidden, null_hidden, key,
                                           (k_drop, k_perm, k_known), known_count, dropout)
            return z, at.targets

        return jax.vmap(one)(tokens, ids, mask, hidden, keys, num_known)

    def _training_inputs(self, batch, keys):
        """A training batch's tokens, captions and cached text (with the empty caption's).

        Tokens come as they are (`tokens`), or are drawn from cached posterior moments
        (`posterior`, the tokenizer's `draw_tokens`), or are encoded from `image`; a draw of
        example `i` uses `jr.fold_in(keys[i], 5)`, apart from the keys the example's other
        choices split from `keys[i]`."""
        if "tokens" in batch:
            tokens = batch["tokens"]
        else:
            draw_keys = jax.vmap(lambda k: jr.fold_in(k, 5))(keys)
            if "posterior" in batch:
                if not self.samples_posterior:
                    raise ValueError(
                        "the batch holds posterior moments (a token cache of a tokenizer that "
                        "samples its posterior: a KL tokenizer with sample_posterior=True), "
                        f"but this model's {type(self.tokenizer).__name__} does not sample its "
                        "posterior: set sample_posterior=True in its kwargs, or rebuild the "
                        "cache without it."
                    )
                with jax.named_scope("tokenizer"):
                    tokens = jax.lax.stop_gradient(jax.vmap(
                        lambda m, k: self.tokenizer.draw_tokens(m, key=k)
                    )(jnp.asarray(batch["posterior"]), draw_keys))
            else:
                tokens = self.encode_images(
                    batch["image"], keys=draw_keys if self.samples_posterior else None
                )
        ids, mask = jnp.asarray(batch["text_ids"]), jnp.asarray(batch["text_mask"])
        hidden = batch.get("text_hidden")
        null_hidden = None
        if hidden is not None:
            if self.text_encoder.trainable:
                raise ValueError(
                    "the batch holds precomputed text_hidden, but the text encoder is trainable: "
                    "its outputs change as it trains. Cache text only for frozen encoders."
                )
            null_hidden = jax.lax.stop_gradient(self.text_encoder(self.null_ids, self.null_mask))
        return tokens, ids, mask, hidden, null_hidden

    def _training_example(self, tokens, ids, mask, hidden, null_hidden, key, subkeys,
                          known_count, dropout):
        """One training example's conditions and positions (`loss_terms`' keys: `key`, and
        the caption-dropout, permutation and known-count keys split from it)."""
        k_drop, k_perm, k_known = subkeys
        n = self.seq_len
        dropped = jr.bernoulli(k_drop, self.caption_dropout)
        ids = jnp.where(dropped, self.null_ids, ids)
        mask = jnp.where(dropped, self.null_mask, mask)
        if hidden is None:
            context = self.encode_text(ids, mask)
        else:
            with jax.named_scope("text"):
                context = self.aligner(jnp.where(dropped, null_hidden, hidden), mask)
        # The order decides what the backbone reads and what the loss counts.
        at = self.order.training_positions(
            n, self.backbone.attention, permutation_key=k_perm, known_key=k_known,
            num_known=known_count,
        )
        # What a backbone takes beyond the contract's arguments (`AbstractBackbone`).
        extra = {}
        takes = _call_keywords(type(self.backbone))
        if dropout and "key" in takes:
            extra["key"] = jr.fold_in(key, 4)  # apart from the four keys split above
        if "max_known" in takes:
            if known_count is not None:
                extra["max_known"] = n
            elif isinstance(self.order, AbstractBoundedOrder):
                extra["max_known"] = self.order.max_num_known(n)
        compute = _float_dtype(self.backbone)
        with jax.named_scope("backbone"):
            x = self.token_embedding(tokens)
            z = self.backbone(x.astype(compute), at.known, context.astype(compute), mask,
                              order=at.order, **extra)
            z = z.astype(jnp.float32)
        return z, at

    # -- sampling -------------------------------------------------------------------------
    @property
    def default_cfg_schedule(self) -> str:
        """The guidance schedule sampling uses unless told: `"linear"` for an order that
        draws a permutation (MAR and Fluid ramp the scale with the masked count);
        `"constant"` for one that does not (raster: LlamaGen guides at a constant scale, and
        no raster model in the literature ramps it)."""
        return "linear" if self.order.random_permutation else "constant"

    def generate(
        self,
        text_ids: Int[Array | np.ndarray, "batch ctx"],
        text_mask: Bool[Array | np.ndarray, "batch ctx"],
        *,
        key: Key,
        steps: int = 64,
        cfg: float = 1.0,
        cfg_schedule: str | None = None,
        temperature: float = 1.0,
        negative_ids: Int[Array | np.ndarray, "batch ctx"] | None = None,
        negative_mask: Bool[Array | np.ndarray, "batch ctx"] | None = None,
        cfg_interval: tuple[float, float] | None = None,
        head_steps: int | tuple[int, ...] | None = None,
        cfg_refresh: int | None = None,
    ) -> Float[Array, "batch h w 3"]:
        """Generate one image per caption.

        **Arguments:**

        - `text_ids`, `text_mask`: tokenized captions (see `fluid.text.TextTokenizer`).
        - `key`: randomness.
        - `steps`: sampling steps requested from the order (raster ignores it).
        - `cfg`: classifier-free guidance scale; 1 disables guidance (static).
        - `cfg_schedule`: `"linear"` (MAR's: at a step, `1 + (cfg - 1) * (n - m) / n` with
          `m` the positions still masked after it, counted as at least one) or `"constant"`
          (static); `None` (the default): `default_cfg_schedule`.
        - `temperature`: passed to the head.
        - `negative_ids`, `negative_mask`: tokenized negative prompts, one per caption: the
          unconditional half of guidance reads them in place of the empty caption, so the
          samples are pushed away from them. Only with guidance (`cfg != 1`). A negative
          prompt that is the empty caption gives the images of no negative prompt.
        - `cfg_interval`: `(lo, hi)`, guidance only at the steps whose progress (the fraction
          of the tokens produced before the step) lies in `[lo, hi)`; the others sample the
          conditional model alone, with half the head's work, and half the backbone's for a
          backbone without state per context (`context_state`; LlamaGen's `cfg_interval` is
          `(0, t / n)`). `None` (the default): every step; `(0, 1)` is the same (static).
        - `head_steps`: the chain of an iterative head (diffusion, flow) in place of its own:
          an int for every token, or a step schedule over progress as DiSA's (a tuple: the
          progress `[0, 1]` cut into that many equal intervals, `annealed_steps` makes one).
          `None`: the head's `progress_steps` if it has them, else its `sampling_steps`
          (static).
        - `cfg_refresh`: `k`, LazyMAR's guidance residual reuse (arXiv 2503.12450): the
          unconditional backbone pass runs only at the guided steps `0, k, 2k, ...` (counted
          among the guided steps); there it also gives the conditions of the positions the
          next `k - 1` guided steps produce, and at those steps the unconditional condition
          is the conditional one less the residual `z_cond - z_uncond` of the refresh, per
          position. `1`: every step, plain guidance; above 1 only for a bidirectional
          backbone. `None` (the default): plain guidance; a no-op without guidance
          (static).

        **Returns:**

        Images in [-1, 1]. Jit this call with `eqx.filter_jit` (steps, cfg and the schedule
        are static); `fluid.sample` does.
        """
        if cfg_schedule is None:
            cfg_schedule = self.default_cfg_schedule
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}.")
        negative = None
        if (negative_ids is None) != (negative_mask is None):
            raise ValueError("give both negative_ids and negative_mask, or neither.")
        if negative_ids is not None:
            negative = (jnp.asarray(negative_ids), jnp.asarray(negative_mask))
        tokens = self.generate_tokens(
            jnp.asarray(text_ids), jnp.asarray(text_mask), key=key, steps=steps, cfg=cfg,
            cfg_schedule=cfg_schedule, temperature=temperature, negative=negative,
            cfg_interval=cfg_interval, head_steps=head_steps, cfg_refresh=cfg_refresh,
        )
        with jax.named_scope("tokenizer"):
            return jax.vmap(self.tokenizer.decode)(tokens)

    def generate_tokens(self, text_ids, text_mask, *, key, steps, cfg, cfg_schedule, temperature,
                        negative=None, cfg_interval=None, head_steps=None, cfg_refresh=None):
        """`generate` without the final decoding: the sampled tokens. `negative`: the
        negative prompts' `(ids, mask)`, or None."""
        guided = cfg != 1.0
        cfg_interval, head_steps, cfg_refresh = sampling_switches(
            self.head, cfg=cfg, negative=negative is not None, cfg_interval=cfg_interval,
            head_steps=head_steps, cfg_refresh=cfg_refresh, backbone=self.backbone)
        self._check_steps(steps)
        keys = jr.split(key, text_ids.shape[0])
        switches = {"cfg_interval": cfg_interval, "head_steps": head_steps,
                    "cfg_refresh": cfg_refresh}
        if negative is None:
            return jax.vmap(
                lambda i, m, k: self._generate_one(i, m, k, steps, guided, cfg, cfg_schedule,
                                                   temperature, **switches)
            )(text_ids, text_mask, keys)
        negative_ids, negative_mask = negative
        if negative_ids.shape != text_ids.shape or negative_mask.shape != text_mask.shape:
            raise ValueError(
                f"negative prompts must be tokenized as the captions, one per caption: "
                f"{negative_ids.shape} ids for captions of {text_ids.shape}."
            )
        return jax.vmap(
            lambda i, m, ni, nm, k: self._generate_one(i, m, k, steps, guided, cfg,
                                                       cfg_schedule, temperature, (ni, nm),
                                                       **switches)
        )(text_ids, text_mask, negative_ids, negative_mask, keys)

    def _check_steps(self, steps: int) -> None:
        """Refuse a step count at which the order produces several positions per step when
        the backbone decodes one at a time."""
        counts = self.order.step_counts(self.seq_len, steps)
        if max(counts) > 1 and not self.backbone.parallel_decode:
            backs = _names_where(
                BACKBONES,
                lambda c: c.parallel_decode and c.attention in self.order.supported_attention,
            )
            raise IncompatibleComponentsError(
                f"the order {type(self.order).__name__} produces up to {max(counts)} positions "
                f"per step at steps={steps}, but the backbone {type(self.backbone).__name__} "
                f"decodes one position per step. Sample with steps={self.seq_len} (the "
                f"model's {self.seq_len} tokens, one per step), or train a backbone that "
                f"decodes several: {', '.join(backs) or 'none registered'}."
            )

    def _contexts(self, ids, mask, guided, negative=None):
        """The caption's context and, under guidance, the unconditional one: the empty
        caption's, or the negative prompt's (`negative`: its ids and mask)."""
        ctx = self.encode_text(ids, mask)
        if not guided:
            return ctx[None], mask[None]
        null_ids, null_mask = (self.null_ids, self.null_mask) if negative is None else negative
        null = self.encode_text(null_ids, null_mask)
        return jnp.stack([ctx, null]), jnp.stack([mask, null_mask])

    def _cfg_at(self, cfg, schedule, produced):
        """The guidance scale of the step after which `produced` positions are known."""
        if schedule == "constant":
            return jnp.asarray(cfg, jnp.float32)
        # MAR's linear schedule (`sample_tokens`): `1 + (cfg - 1) * (n - m) / n` with `m`
        # the positions still masked after the step as MAR clamps it, at least one; so the
        # last step's scale is `1 + (cfg - 1) * (n - 1) / n`, never `cfg`.
        n = self.seq_len
        masked = jnp.maximum(n - produced, 1)
        return 1.0 + (cfg - 1.0) * (n - masked).astype(jnp.float32) / n

    @staticmethod
    def _sample_head(head, z, guided, cfg_value, temperature, key, steps=None):
        """Sample tokens at the `k` positions given by `z`: `[1 or 2, k, dim]`; `steps`: the
        chain length of an iterative head (static; `None`: its own)."""
        keys = jr.split(key, z.shape[1])
        chain = {} if steps is None else {"steps": steps}
        with jax.named_scope("head"):
            if guided:
                return jax.vmap(
                    lambda c, u, k: head.sample(c, u, cfg_value, temperature, key=k, **chain)
                )(z[0], z[1], keys)
            return jax.vmap(
                lambda c, k: head.sample(c, None, 1.0, temperature, key=k, **chain)
            )(z[0], keys)

    def _step_plan(self, counts, guided, cfg_interval, head_steps, cfg_refresh=None):
        """Per sampling step, what is static about it: `(positions produced, guided, head
        chain length or None, residual)`. Progress at a step is the fraction of the tokens
        produced before it (0 at the first step), as DiSA and a guidance interval read it.

        `residual` is `None` at a step that runs the backbone under every context (plain
        guidance, or none); under `cfg_refresh = k`, at a refresh step followed by reuse
        steps it is how many positions the refresh gives conditions for (its own and those
        of the next `k - 1` guided steps), and `0` at a reuse step, which runs the
        conditional pass alone. A guided run that an unguided step interrupts starts with a
        refresh."""
        n = self.seq_len
        iterative = isinstance(self.head, AbstractIterativeHead)
        if isinstance(head_steps, int):
            head_steps = (head_steps,)
        if head_steps is not None:
            head_steps = as_progress_steps(head_steps, 1)
        elif iterative and self.head.progress_steps is not None:
            head_steps = self.head.progress_steps
        plan, produced, since, refresh = [], 0, 0, None
        for k in counts:
            progress = produced / n
            on = guided and (cfg_interval is None
                             or cfg_interval[0] <= progress < cfg_interval[1])
            chain = None if head_steps is None else head_steps[
                progress_level(len(head_steps), progress)]
            residual = None
            if on and cfg_refresh is not None:
                if since % cfg_refresh == 0:
                    refresh = len(plan)
                else:  # the refresh step reads this step's positions too
                    kk, g, c, span = plan[refresh]
                    plan[refresh] = (kk, g, c, (span or kk) + k)
                    residual = 0
                since += 1
            else:
                since = 0
            plan.append((k, on, chain, residual))
            produced += k
        return plan

    def _empty_tokens(self):
        n = self.seq_len
        if self.tokenizer.token_kind == CONTINUOUS:
            return jnp.zeros((n, self.tokenizer.token_dim), jnp.float32)
        return jnp.zeros((n,), jnp.int32)

    def _generate_one(self, ids, mask, key, steps, guided, cfg, schedule, temperature,
                      negative=None, cfg_interval=None, head_steps=None, cfg_refresh=None):
        """One example: the order's steps, each asking the backbone for the conditions at
        the positions it produces (`init_decode`/`decode`, the same for every backbone),
        the head for their tokens, and writing them."""
        n = self.seq_len
        if self.order.random_permutation:
            k_perm, key = jr.split(key)
        else:  # a fixed order leaves the whole key to the steps
            k_perm = key
        perm = self.order.permutation(n, key=k_perm)
        ctx, ctx_mask = self._contexts(ids, mask, guided, negative)
        counts = self.order.step_counts(n, steps)
        with jax.named_scope("backbone"):
            state = self.backbone.init_decode(ctx, ctx_mask)
        head, token_embedding, backbone = self.head, self.token_embedding, self.backbone
        if isinstance(backbone, AbstractCausalBackbone):
            # A cached decoder runs each step on one vector: products per vector, in the
            # loop's every layer (`fluid.nn.per_vector`).
            head, token_embedding, backbone = per_vector((head, token_embedding, backbone))
        embed = token_embedding.embed_one
        tokens = self._empty_tokens()
        start = 0
        # Steps that produce the same number of tokens, with the same guidance and head chain,
        # share one scan: shapes stay static and the head runs on exactly the positions
        # produced at each step. Under `cfg_refresh` a refresh step and its reuse steps form
        # one block, unrolled in the scan's body, so the residual stays a local value.
        plan = self._step_plan(counts, guided, cfg_interval, head_steps, cfg_refresh)
        # A backbone whose cost follows the number of known positions (the `mae` encoder's
        # slots) is told a static bound on it at each step: the most known before that step
        # in any iteration of its scan (exactly the count for a scan of one iteration).
        bounded = "max_known" in inspect.signature(type(backbone).decode).parameters
        for block, run in itertools.groupby(_blocks(plan)):
            length = len(list(run))
            size = sum(step[0] for step in block)

            def body(carry, i, block=block, start=start, size=size, length=length):
                tokens, state, key = carry
                first = start + i * size
                bound = start + (length - 1) * size
                for k, guided_step, chain, residual in block:
                    key, sub = jr.split(key)
                    idx = jax.lax.dynamic_slice(perm, (first,), (k,))
                    decode = (functools.partial(backbone.decode, max_known=max(bound, 1))
                              if bounded else backbone.decode)
                    with jax.named_scope("backbone"):
                        if residual is None and guided and not guided_step and not (
                                backbone.context_state):
                            # Outside the guidance interval nothing reads the unconditional
                            # pass, and no per-context state needs it: the caption's alone.
                            z, state = decode(state, tokens, embed, idx, ctx[:1],
                                              ctx_mask[:1])
                        elif residual is None:
                            z, state = decode(state, tokens, embed, idx, ctx, ctx_mask)
                        elif residual:  # a refresh: both passes, over the block's positions
                            ahead = jax.lax.dynamic_slice(perm, (first,), (residual,))
                            z, _ = decode(state, tokens, embed, ahead, ctx, ctx_mask)
                            # A bidirectional backbone's state is which positions are known
                            # (`AbstractBidirectionalBackbone.decode`).
                            state = state.at[idx].set(True)
                            cached = z[0, k:] - z[1, k:]
                            z, used = z[:, :k], 0
                        else:  # a reuse step: the conditional pass alone
                            z, state = decode(state, tokens, embed, idx, ctx[:1],
                                              ctx_mask[:1])
                            z = jnp.stack([z[0], z[0] - cached[used:used + k]])
                            used += k
                    cfg_value = self._cfg_at(cfg, schedule, first + k)
                    new = self._sample_head(head, z, guided_step, cfg_value, temperature, sub,
                                            chain)
                    tokens = tokens.at[idx].set(new)
                    with jax.named_scope("backbone"):
                        state = backbone.observe(state, tokens, embed, idx, ctx, ctx_mask)
                    first = first + k
                    bound = bound + k
                return (tokens, state, key), None

            (tokens, state, key), _ = jax.lax.scan(
                body, (tokens, state, key), jnp.arange(length, dtype=jnp.int32)
            )
            start += size * length
        return tokens


def _blocks(plan):
    """The plan's steps in blocks: a refresh step with the reuse steps that follow it
    (`FluidModel._step_plan`), every other step alone."""
    blocks = []
    for step in plan:
        if step[3] == 0:
            blocks[-1] = blocks[-1] + (step,)
        else:
            blocks.append((step,))
    return blocks
