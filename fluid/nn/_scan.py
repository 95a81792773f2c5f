"""Scanning a stack of layers with rematerialisation: one place for the memory/compute trade."""

from collections.abc import Callable
from typing import Any, TypeAlias, TypeVar

import jax

Carry = TypeVar("Carry")

# What the backward pass keeps from a scanned layer's forward pass (`jax.checkpoint`'s
# `policy`), or `None`: keep every intermediate (a plain `lax.scan`).
RematPolicy: TypeAlias = Callable[..., bool] | None

# The default policy: keep the outputs of the matrix products without batch dimensions (the
# linear layers). Everything else (normalisations, activations, attention logits and
# weights) is recomputed from them. The residuals a plain `lax.scan` stacks cost more to
# write than to recompute: on a 2-core CPU this policy makes the `mar256` train step about
# 0.85x the time of saving everything (`benchmarks/remat.py`), and it keeps activation
# memory to about one product output per linear layer.
DEFAULT_REMAT_POLICY: RematPolicy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def scan_layers(
    layer: Callable[[Carry, Any], Carry],
    carry: Carry,
    params: Any,
    *,
    remat: RematPolicy = DEFAULT_REMAT_POLICY,
) -> Carry:
    """`carry = layer(carry, p)` for each slice `p` along the leading axis of `params`: one
    compiled layer under `lax.scan`, rematerialised in the backward pass by `remat`.

    Values and gradients are those of the plain loop; the policy only decides what the
    backward pass recomputes instead of reading back.

    **Arguments:**

    - `layer`: one layer's step.
    - `carry`: the input of the first layer.
    - `params`: a pytree whose array leaves have a leading depth axis.
    - `remat`: a `jax.checkpoint_policies` policy, or `None` for a plain scan (every
      intermediate saved); `DEFAULT_REMAT_POLICY` by default.
    """

    def body(h, p):
        return layer(h, p), None

    if remat is not None:
        body = jax.checkpoint(body, policy=remat)
    out, _ = jax.lax.scan(body, carry, params)
    return out
