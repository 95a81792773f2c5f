"""Weights of MAR's diffusion MLP (`SimpleMLPAdaLN`, LTH14/mar) into a `DiffusionHead`."""

from collections.abc import Callable, Mapping

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._diffusion import DiffusionHead


class MarCheckpointError(ValueError):
    """A MAR state dict that does not fit the head: a missing, unexpected or mis-shaped key."""


def _mar_layout(head: DiffusionHead) -> dict[str, tuple[Callable, int | None]]:
    """MAR parameter name -> (where it goes in the head, block index or None).

    Torch's `Linear.weight` is `[out, in]`, as Equinox's, so no transposes are needed.
    """
    layout: dict[str, tuple[Callable, int | None]] = {
        "time_embed.mlp.0.weight": (lambda h: h.time_fc1.weight, None),
        "time_embed.mlp.0.bias": (lambda h: h.time_fc1.bias, None),
        "time_embed.mlp.2.weight": (lambda h: h.time_fc2.weight, None),
        "time_embed.mlp.2.bias": (lambda h: h.time_fc2.bias, None),
        "cond_embed.weight": (lambda h: h.cond_embed.weight, None),
        "cond_embed.bias": (lambda h: h.cond_embed.bias, None),
        "input_proj.weight": (lambda h: h.input_proj.weight, None),
        "input_proj.bias": (lambda h: h.input_proj.bias, None),
        "final_layer.linear.weight": (lambda h: h.final_linear.weight, None),
        "final_layer.linear.bias": (lambda h: h.final_linear.bias, None),
        "final_layer.adaLN_modulation.1.weight": (lambda h: h.final_modulation.weight, None),
        "final_layer.adaLN_modulation.1.bias": (lambda h: h.final_modulation.bias, None),
    }
    block_params = {
        "in_ln.weight": lambda h: h.block_norm.weight,
        "in_ln.bias": lambda h: h.block_norm.bias,
        "mlp.0.weight": lambda h: h.block_fc1.weight,
        "mlp.0.bias": lambda h: h.block_fc1.bias,
        "mlp.2.weight": lambda h: h.block_fc2.weight,
        "mlp.2.bias": lambda h: h.block_fc2.bias,
        "adaLN_modulation.1.weight": lambda h: h.block_modulation.weight,
        "adaLN_modulation.1.bias": lambda h: h.block_modulation.bias,
    }
    for i in range(head.depth):
        for name, where in block_params.items():
            layout[f"res_blocks.{i}.{name}"] = (where, i)
    return layout


def load_mar_diffloss(
    head: DiffusionHead, state_dict: Mapping[str, np.ndarray], prefix: str = ""
) -> DiffusionHead:
    """`head` with its network's parameters replaced by those of a MAR `DiffLoss.net`.

    Every MAR parameter under `prefix` must be present with the head's shape, and every key
    under `prefix` must be one of them: nothing is skipped silently. Keys outside `prefix`
    (the rest of a full MAR checkpoint) are ignored.

    **Arguments:**

    - `head`: a head of the checkpoint's sizes (its values are replaced, not read).
    - `state_dict`: parameter name -> array, as MAR's `state_dict()` names them, converted
      to NumPy (for example from a safetensors file).
    - `prefix`: the path of the network in the state dict; a full MAR checkpoint keeps it
      under `"diffloss.net."`.

    **Returns:**

    A new head with the loaded float32 parameters.

    **Raises:**

    `MarCheckpointError` naming the first missing, unexpected or mis-shaped key.
    """
    layout = _mar_layout(head)
    ours = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    missing = [prefix + k for k in layout if k not in ours]
    if missing:
        raise MarCheckpointError(
            f"MAR checkpoint lacks {len(missing)} key(s) the head needs, first {missing[0]!r}; "
            f"missing: {missing}."
        )
    unexpected = [prefix + k for k in ours if k not in layout]
    if unexpected:
        raise MarCheckpointError(
            f"MAR checkpoint has key(s) under prefix {prefix!r} that the head has no place "
            f"for (is `depth` right?): {unexpected}."
        )

    wheres, values = [], []
    stacked: dict[str, tuple[Callable, list[np.ndarray]]] = {}
    for name, (where, block) in layout.items():
        leaf = where(head)
        expected = leaf.shape if block is None else leaf.shape[1:]
        value = np.asarray(ours[name])
        if value.shape != expected:
            raise MarCheckpointError(
                f"MAR key {prefix + name!r} has shape {value.shape}, expected "
                f"{tuple(expected)} for this head."
            )
        if block is None:
            wheres.append(where)
            values.append(jnp.asarray(value, leaf.dtype))
        else:
            # Blocks are stacked along the leading axis; gather block i of each parameter.
            suffix = name.split(".", 2)[2]
            stacked.setdefault(suffix, (where, []))[1].append(value)
    for where, parts in stacked.values():
        wheres.append(where)
        values.append(jnp.asarray(np.stack(parts), where(head).dtype))
    return eqx.tree_at(lambda h: tuple(w(h) for w in wheres), head, tuple(values))
