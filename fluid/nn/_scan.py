"""Scanning a stack of layers with rematerialisation: one place for the memory/compute trade."""

from collections.abc import Callable
from typing import Any, TypeVar

import jax

Carry = TypeVar("Carry")

# What the backward pass keeps from each layer's forward pass: the outputs of the matrix
# products without batch dimensions (the linear layers). Everything else (normalisations,
# activations, attention logits and weights) is recomputed from them. The residuals a plain
# `lax.scan` stacks cost more to write than to recompute: on a 2-core CPU this policy makes
# the `mar256` train step about 0.85x the time of saving everything (`benchmarks/remat.py`),
# and it keeps activation memory to about one product output per linear layer.
# `None` saves every intermediate (a plain scan); `benchmarks/remat.py` swaps policies here.
REMAT_POLICY: Callable[..., bool] | None = jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def scan_layers(layer: Callable[[Carry, Any], Carry], carry: Carry, params: Any) -> Carry:
    """`carry = layer(carry, p)` for each slice `p` along the leading axis of `params`: one
    compiled layer under `lax.scan`, rematerialised in the backward pass by `REMAT_POLICY`.

    Values and gradients are those of the plain loop; the policy only decides what the
    backward pass recomputes instead of reading back.
    """

    def body(h, p):
        return layer(h, p), None

    if REMAT_POLICY is not None:
        body = jax.checkpoint(body, policy=REMAT_POLICY)
    out, _ = jax.lax.scan(body, carry, params)
    return out
