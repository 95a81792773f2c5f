"""Optimiser, learning-rate schedules, trainable and weight-decay masks, EMA."""

import functools

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax

from ..config import OptimConfig
from ._rules import first_match, map_with_names

# No decay on the diffusion/softmax head (as MAR), norms, biases, embeddings, 1-D params.
NO_DECAY_RULES: tuple[tuple[str, bool], ...] = (
    (r"^head\.", False),
    # A norm module's `.weight`/`.bias`, or a norm scale stored bare (T5's `layers.attn_norm`).
    (r"(^|\.)(norm|ln|[a-z_]*_norm|[a-z_]*_ln)\d*(\.|$)", False),
    (r"\.bias$", False),
    (r"embed", False),
)


# MAR's `add_weight_decay` (util/misc.py): no decay on the diffusion head ("diffloss"),
# biases and 1-D parameters. MAR holds its learned embeddings with leading unit axes
# (`fake_latent` [1, dim], `mask_token` [1, 1, dim], the position embeddings [1, seq, dim]),
# so its 1-D parameters are its LayerNorms' scales and shifts: named here by rule, since
# fluid stores those embeddings without the unit axes and its stacked norms with a layer axis.
MAR_NO_DECAY_RULES: tuple[tuple[str, bool], ...] = (
    NO_DECAY_RULES[0],  # the head
    NO_DECAY_RULES[1],  # norms
    (r"\.bias$", False),
)


def decay_mask(params, rules: str = "fluid"):
    """True where weight decay applies.

    `rules` (`OptimConfig.decay_rules`): `"fluid"`, matrices outside the rules in
    `NO_DECAY_RULES`; `"mar"`, every parameter outside `MAR_NO_DECAY_RULES` (MAR's: all but
    the head, biases and norms, embeddings of any rank included).
    """
    if rules == "mar":
        return map_with_names(
            lambda name, x: x is not None and first_match(name, MAR_NO_DECAY_RULES, True),
            params,
        )
    return map_with_names(
        lambda name, x: x is not None
        and x.ndim >= 2
        and first_match(name, NO_DECAY_RULES, True),
        params,
    )


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up, then constant or cosine decay to zero at `total_steps`."""
    warmup = max(int(config.warmup_steps), 0)
    lr = config.learning_rate
    if config.schedule == "constant":
        after = optax.constant_schedule(lr)
    else:
        after = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1))
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (Fluid's betas and decay) behind global-norm clipping (MAR's 3.0)."""
    parts = []
    if config.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(config.grad_clip))
    parts.append(
        optax.adamw(
            learning_rate_schedule(config, total_steps),
            b1=config.b1,
            b2=config.b2,
            weight_decay=config.weight_decay,
            mask=functools.partial(decay_mask, rules=config.decay_rules),
        )
    )
    return optax.chain(*parts)


def ema_update(ema, params, decay: float):
    """`decay * ema + (1 - decay) * params`, leaf by leaf."""
    # Not `e + (1 - decay) * (p - e)`: that rounds `p - e`, so decay 0 ("no averaging")
    # would not give `params` back exactly.
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jtu.tree_leaves(tree)))
