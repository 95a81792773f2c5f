"""Whether a checkpoint fits the run that reads it: `check_config` compares its config with
the run's, key by key, except the keys a resumed run may change (`RESUMABLE_CONFIG_KEYS`);
`CheckpointMismatchError` is what a checkpoint that does not fit raises (here, and for arrays
of another shape in `CheckpointManager.restore`)."""

import fnmatch
import json
from typing import Any

from .._errors import UserError

# Config keys that may differ between a checkpoint and the run resuming from it, as
# `fnmatch` patterns over the full dotted key (so `steps` is the top-level field only, not
# `optim.warmup_steps`):
# - `steps`: resuming to train for longer (or shorter) is the point of resuming;
# - `*_every`: logging, sampling, evaluation and checkpoint cadence do not change the state;
# - `sample_*`: how preview samples are drawn (steps, guidance, temperature);
# - `mesh*`: the device mesh; checkpoints restore onto a mesh of any shape;
# - `keep_checkpoints`, `data.workers`: how many checkpoints to keep, how many processes
#   decode images (the batches do not depend on it);
# - `data.on_change`: what to do if the data changed, asked when resuming.
RESUMABLE_CONFIG_KEYS: tuple[str, ...] = (
    "steps", "*_every", "sample_*", "mesh*", "keep_checkpoints", "data.workers",
    "data.on_change",
)

# Config keys added after runs were saved without them, with the value those earlier runs
# had: a checkpoint whose config lacks one matches a run that has exactly that value.
ADDED_CONFIG_KEYS: dict[str, Any] = {
    "model.aligner": "transformer",
    "model.token_norm": True,
    "optim.decay_rules": "fluid",
    "model.lora_rank": 0,
    "model.lora_alpha": None,
    "init_from": None,
    "init_strict": True,
    "freeze": [],
    "data.style": "flat",
}

_ABSENT = object()


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint was made with another config, or holds arrays that do not fit the state."""


def _flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        # An empty dict stays a value, so `kwargs={}` still differs from `kwargs={"a": 1}`.
        if isinstance(value, dict) and value:
            out.update(_flatten_config(value, f"{name}."))
        else:
            out[name] = value
    return out


def _json_value(value: Any) -> Any:
    # A saved config went through JSON (tuples became lists); compare the current one alike.
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


def _show(key: str, value: Any) -> str:
    if value is _ABSENT:
        return f"no {key}"
    return f"{key}={json.dumps(value)}"


def check_config(
    saved: dict[str, Any], current: dict[str, Any], *, source: str = "the checkpoint"
) -> None:
    """Raise if a checkpoint's config differs from this run's in a key that matters.

    Nested dicts are compared key by key under dotted names (`model.head.kwargs.width`);
    keys matching a pattern of `RESUMABLE_CONFIG_KEYS` are skipped; a key of
    `ADDED_CONFIG_KEYS` that the saved config lacks counts as the value runs had before it.

    **Arguments:**

    - `saved`: the config stored with the checkpoint (`CheckpointManager.saved_config`).
    - `current`: this run's config as a dict (`fluid.config.to_dict(config)`).
    - `source`: how the message names the checkpoint, e.g. its directory.

    **Returns:**

    Nothing.

    **Raises:**

    `CheckpointMismatchError` naming the first differing key (in the order of `current`, then
    keys only `saved` has) with both values.
    """
    flat_saved = _flatten_config(saved)
    flat_current = _flatten_config(current)
    keys = [*flat_current, *(k for k in flat_saved if k not in flat_current)]
    for key in keys:
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE_CONFIG_KEYS):
            continue
        old = flat_saved.get(key, _ABSENT)
        new = flat_current.get(key, _ABSENT)
        if old is _ABSENT and key in ADDED_CONFIG_KEYS:
            old = ADDED_CONFIG_KEYS[key]  # saved before the key existed
        if old is _ABSENT or new is _ABSENT or _json_value(old) != _json_value(new):
            raise CheckpointMismatchError(
                f"{source} was made with {_show(key, old)}, this run has {_show(key, new)}; "
                "resume with the same config or start a fresh output directory."
            )

