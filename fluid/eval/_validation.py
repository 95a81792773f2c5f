"""Validation loss, measured the same way for every variant on a fixed held-out set.

Every number is deterministic: example `i` of the held-out set gets the key
`fold_in(key(seed), i)`, whatever batch it arrives in, and each setting (mask ratio, noise
draw) a key folded in from that. The model's caption dropout is off: this is the loss of
the conditional model.
"""

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.typing import ArrayLike
from jaxtyping import Array, Float, Int

from .._types import CAUSAL, DISCRETE, Key
from ..model import FluidModel

# 8 evenly spaced mask ratios in (0, 1]: what a bidirectional model was scored at before
# the ratios came from its order (`validation_mask_ratios`); kept for explicit use.
MASK_RATIOS = tuple((i + 1) / 8 for i in range(8))
# Ratios a bidirectional model is scored at: quantiles of its order's training draw.
RATIO_COUNT = 8
# Forward passes per example and mask ratio, each with fresh head noise.
NOISE_DRAWS = 2
# Held-out `shapes` items come from this seed offset from the training data's seed: items
# depend only on `(seed, index)`, so no held-out item is one that training reads.
VALIDATION_SEED_OFFSET = 1 << 20
VALIDATION_EXAMPLES = 256


def validation_batches(
    data_config: Any,
    text_tokenizer: Any,
    *,
    text_len: int,
    count: int = VALIDATION_EXAMPLES,
    batch_size: int = 64,
) -> list[dict[str, np.ndarray]]:
    """The fixed held-out set of a run on the built-in `shapes` data, in batches.

    **Arguments:**

    - `data_config`: the run's `DataConfig`; its `shapes` options (image size, categories,
      object scale, layout) are kept, its seed offset by `VALIDATION_SEED_OFFSET`.
    - `text_tokenizer`: the run's caption tokenizer.
    - `text_len`: the run's caption length (`ModelConfig.text_len`).
    - `count`: held-out examples (items `0, ..., count - 1` of the held-out seed).
    - `batch_size`: examples per batch (the last batch may be smaller).

    **Returns:**

    Batches with `image`, `text_ids` and `text_mask`, as `FluidModel.loss` takes them.
    Raises `ValueError` for a run on other data: pass its own held-out batches to
    `validation_loss`.
    """
    from ..data.shapes import ShapesDataset, shapes_options

    if data_config.dataset != "shapes":
        raise ValueError(
            f"held-out data is built in for the shapes data set only, not {data_config.dataset!r}: "
            "pass batches of your own held-out images and captions to validation_loss."
        )
    data = ShapesDataset(
        data_config.image_size, seed=data_config.seed + VALIDATION_SEED_OFFSET,
        **shapes_options(data_config),
    )
    batches = []
    for start in range(0, count, batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, count))]
        ids, mask = text_tokenizer.encode([item["caption"] for item in items], text_len)
        batches.append(
            {
                "image": np.stack([item["image"] for item in items]),
                "text_ids": np.asarray(ids),
                "text_mask": np.asarray(mask),
            }
        )
    return batches


def known_counts(seq_len: int, mask_ratios: Sequence[float]) -> list[int]:
    """Known positions at each mask ratio, by the formula of `RandomOrder.num_known`: of
    `n` positions, `ceil(n * ratio)` (at least one) are masked."""
    out = []
    for ratio in mask_ratios:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"mask ratios lie in (0, 1], got {ratio}.")
        out.append(seq_len - min(max(math.ceil(seq_len * ratio), 1), seq_len))
    return out


def validation_mask_ratios(model: FluidModel, count: int = RATIO_COUNT) -> tuple[float, ...]:
    """The mask ratios a bidirectional `model` is scored at by default: `count` quantiles of
    its order's training draw (`AbstractGenerationOrder.validation_mask_ratios`), so that a
    model trained on MAR's ratios (at least 70% masked) is not scored at ratios it never
    saw, and the mean over them estimates its training objective."""
    return model.order.validation_mask_ratios(count)


def _conditional(model: FluidModel) -> FluidModel:
    """`model` without caption dropout (a static field: rebuilt through the constructor)."""
    return FluidModel(
        tokenizer=model.tokenizer,
        text_encoder=model.text_encoder,
        aligner=model.aligner,
        token_embedding=model.token_embedding,
        backbone=model.backbone,
        head=model.head,
        order=model.order,
        null_text=(model.null_ids, model.null_mask),
        caption_dropout=0.0,
    )


@eqx.filter_jit
def _batch_terms(
    model: FluidModel,
    batch: Mapping[str, Array],
    indices: Int[Array, " batch"],
    key: Key,
    counts: Int[Array, " ratios"] | None,
    noise_draws: int,
) -> tuple[Float[Array, "settings batch"], Float[Array, "settings batch"]]:
    """Per setting (ratio-major, then draw) and example: summed loss and target count."""
    # Tokens once; the settings below reuse them.
    batch = {
        "tokens": model.encode_images(batch["image"]),
        "text_ids": batch["text_ids"],
        "text_mask": batch["text_mask"],
    }
    example_keys = jax.vmap(lambda i: jr.fold_in(key, i))(indices)
    num_ratios = 1 if counts is None else counts.shape[0]
    bsz = indices.shape[0]

    def setting(s):
        keys = jax.vmap(lambda k: jr.fold_in(k, s))(example_keys)
        known = None if counts is None else jnp.full((bsz,), counts[s // noise_draws])
        # No dropout in the backbone: a model is evaluated as it samples.
        return model.loss_terms(batch, keys=keys, num_known=known, dropout=False)

    # One setting at a time: memory stays that of one batch.
    return jax.lax.map(setting, jnp.arange(num_ratios * noise_draws, dtype=jnp.int32))


def validation_loss_terms(
    model: FluidModel,
    batches: Iterable[Mapping[str, ArrayLike]],
    *,
    seed: int = 0,
    mask_ratios: Sequence[float] | None = None,
    noise_draws: int = NOISE_DRAWS,
    chunk_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed validation loss and number of target tokens, per mask ratio.

    **Arguments:** as `validation_loss`.

    **Returns:**

    Two float64 arrays `[len(mask_ratios)]` (`[1]` for a causal model): the loss summed
    over every target token of every example and noise draw at that ratio, and the number
    of those target tokens. Their ratio is the per-token loss at that mask ratio.
    """
    if noise_draws < 1:
        raise ValueError(f"noise_draws must be at least 1, got {noise_draws}.")
    names = ("image", "text_ids", "text_mask")
    batches = list(batches)
    if not batches:
        raise ValueError("no validation batches were given.")
    examples = {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in names}
    total_examples = len(examples["text_ids"])
    model = _conditional(model)
    causal = model.backbone.attention == CAUSAL
    if mask_ratios is None:
        mask_ratios = validation_mask_ratios(model)
    counts = None if causal else jnp.asarray(known_counts(model.seq_len, mask_ratios), jnp.int32)
    num_ratios = 1 if causal else len(mask_ratios)
    key = jr.key(seed)
    totals = np.zeros(num_ratios, np.float64)
    targets = np.zeros(num_ratios, np.float64)
    # Fixed-size chunks (the last padded with copies of the final example, whose results
    # are dropped): one compilation, and the same computation for every example whatever
    # batches the set came in.
    chunk = min(chunk_size, total_examples)
    for start in range(0, total_examples, chunk):
        take = np.minimum(np.arange(start, start + chunk), total_examples - 1)
        arrays = {k: jnp.asarray(v[take]) for k, v in examples.items()}
        indices = jnp.asarray(take, jnp.int32)
        total, count = _batch_terms(model, arrays, indices, key, counts, noise_draws)
        real = min(chunk, total_examples - start)
        for sums, terms in ((totals, total), (targets, count)):
            per_ratio = np.asarray(terms, np.float64).reshape(num_ratios, noise_draws, chunk)
            sums += per_ratio[..., :real].sum((1, 2))
    return totals, targets


def validation_summary(
    model: FluidModel, totals: np.ndarray, targets: np.ndarray, *, examples: int,
    noise_draws: int
) -> dict[str, Any]:
    """The `validation` entry of an evaluation result from `validation_loss_terms`'s sums:
    the loss per target token, per mask ratio (`None` for a causal model), its units, and
    what it was measured on."""
    causal = model.backbone.attention == CAUSAL
    return {
        "loss": float(totals.sum() / targets.sum()),
        "by_mask_ratio": None if causal else {
            f"{ratio:.4g}": float(t / c)
            for ratio, t, c in zip(validation_mask_ratios(model), totals, targets)
        },
        "units": "nats per token (cross-entropy)" if model.tokenizer.token_kind == DISCRETE
        else "diffusion loss per token (noise MSE + variance term)",
        "examples": examples,
        "noise_draws": noise_draws,
        "target_tokens": int(targets.sum()),
    }


def validation_loss(
    model: FluidModel,
    batches: Iterable[Mapping[str, ArrayLike]],
    *,
    seed: int = 0,
    mask_ratios: Sequence[float] | None = None,
    noise_draws: int = NOISE_DRAWS,
    chunk_size: int = 64,
) -> float:
    """The loss per target token over a held-out set, measured alike for every variant.

    A causal (raster) model is scored by its ordinary teacher-forced loss: every position
    is a target. A bidirectional (random-order) model is scored at fixed mask ratios
    instead of the order's random draw (by default `validation_mask_ratios(model)`, the
    draw's quantiles): each example at each ratio of `mask_ratios`, with
    `ceil(seq * ratio)` positions masked (a ratio of 1 masks all of them); the result is
    the mean over all target tokens of all ratios, so ratios with more targets weigh more
    (`validation_loss_terms` gives each ratio's sums).

    The loss is the head's own, per token: for a softmax head the cross-entropy in nats;
    for a diffusion head MAR's diffusion loss (the mean squared error of the predicted
    noise, plus the small variational-bound term that trains the variance). Losses of
    continuous and discrete tokens are not comparable with each other; compare variants
    within one token kind, as the paper does. A diffusion loss depends on the drawn
    timesteps and noise: each example is evaluated `noise_draws` times (at each ratio),
    each pass drawing the head's `batch_mul` timesteps and noises per token afresh, and
    every draw comes from fixed keys, so the number is the same on every call. Caption
    dropout is off, and so is the backbone's dropout (the `mae` backbone's).

    **Arguments:**

    - `model`: the model (its EMA weights, typically).
    - `batches`: held-out batches with `image`, `text_ids` and `text_mask`
      (`validation_batches` builds them for `shapes` runs). Example `i` (counted over all
      batches) always gets the same keys and is computed in the same fixed-size chunk, so
      how the set is split into batches does not change the result, not even in the last
      bit.
    - `seed`: seed of the keys.
    - `mask_ratios`: masked fractions in (0, 1] for bidirectional models; by default
      `validation_mask_ratios(model)`.
    - `noise_draws`: forward passes per example and ratio.
    - `chunk_size`: examples per forward pass (memory against speed; it changes the
      result only by rounding).

    **Returns:**

    The loss per target token, a Python float.
    """
    totals, targets = validation_loss_terms(
        model, batches, seed=seed, mask_ratios=mask_ratios, noise_draws=noise_draws,
        chunk_size=chunk_size,
    )
    return float(totals.sum() / targets.sum())
