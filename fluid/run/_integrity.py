"""Saved models that notice damage: `model.eqx` with its size and SHA-256 in `model.json`.

`save_model_file` writes the leaves with `eqx.tree_serialise_leaves` and, beside them, a
sidecar named by the model file's stem:

```
{"format": 1, "step": 1200, "bytes": 5326848, "sha256": "9f86d0..."}
```

`load_model_file` checks the size and digest before reading any array, then reads the leaves
into a skeleton, checking each one's shape and dtype on the way. Every way this can fail (a
file cut short, bytes changed in place, a file of another model config) ends in one
`CorruptModelError` whose message names the file and says what to do. A model saved before
sidecars existed still loads, unverified.

`file_digest` is also what checkpoints (`fluid.run.CheckpointManager`) record per file.
"""

import hashlib
import json
import operator
import os
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
from etils import epath

from .._errors import MissingInputError, UserError
from .._paths import path_name
from ._layout import RunFolder, model_info_path

MODEL_INFO_FORMAT = 1

# Large enough that hashing runs at disk speed, small enough not to matter in memory.
_CHUNK = 1 << 20


class CorruptModelError(UserError, ValueError):
    """A saved model file is cut short, changed since it was saved, or does not fit the model
    it is loaded into."""


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's contents, read in chunks.

    **Arguments:**

    - `path`: a local path or any path `etils.epath` opens (e.g. `gs://...`).

    **Returns:**

    The digest as 64 lowercase hexadecimal characters.
    """
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _advice(path: Path) -> str:
    checkpoints = RunFolder(path.parent).checkpoints
    elsewhere = (
        f"load a checkpoint from {checkpoints}/ instead"
        if checkpoints.is_dir()
        else "load one of the run's checkpoints (<run>/checkpoints/<step>) instead"
    )
    return f"save the model again from training (Recipe.save), or {elsewhere}"


def brief_error(error: BaseException) -> str:
    """An exception in one line of at most 300 characters, for a message that names a file.
    (Tensorstore appends its whole JSON spec; the chained exception keeps the full text.)"""
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 300 else text[:300] + "..."


def describe_array(shape: Any, dtype: Any) -> str:
    """`float32[4,8]`: an array's dtype and shape, as error messages print them."""
    return f"{np.dtype(dtype).name}[{','.join(str(d) for d in shape)}]"


def save_model_file(path: str | os.PathLike, model: Any, *, step: int) -> None:
    """Write a model's leaves to `path` and its size and checksum to the sidecar beside it.

    Both files are written under temporary names and renamed into place, the model file
    first. A crash between the two renames leaves the new model beside the previous sidecar,
    whose checksum no longer matches: `load_model_file` then reports the model as damaged
    rather than loading it under the old step. A crash before leaves the previous pair intact.

    **Arguments:**

    - `path`: the model file, conventionally `<directory>/model.eqx`; the sidecar is the same
      name ending in `.json` (`model.json`). The directory must exist.
    - `model`: any pytree `eqx.tree_serialise_leaves` accepts (an `eqx.Module`).
    - `step`: the training step of the weights, recorded in the sidecar.

    **Returns:**

    Nothing.
    """
    path = Path(path)
    info_path = model_info_path(path)
    step = operator.index(step)
    # The process id keeps two writers to one directory off each other's temporary files.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    info_tmp = info_path.with_name(f".{info_path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            eqx.tree_serialise_leaves(f, model)
            f.flush()
            # On disk before the rename, so a power cut cannot leave a renamed empty file.
            os.fsync(f.fileno())
        info = {
            "format": MODEL_INFO_FORMAT,
            "step": step,
            "bytes": tmp.stat().st_size,
            "sha256": file_digest(tmp),
        }
        with open(info_tmp, "w") as f:
            f.write(json.dumps(info, indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        os.replace(info_tmp, info_path)
    finally:
        for leftover in (tmp, info_tmp):
            leftover.unlink(missing_ok=True)


def read_model_info(path: str | os.PathLike) -> dict[str, Any] | None:
    """What `save_model_file` recorded beside a model file.

    **Arguments:**

    - `path`: the model file (`model.eqx`), not the sidecar.

    **Returns:**

    The sidecar's contents, `{"format": 1, "step": int, "bytes": int, "sha256": str}`; or
    `None` if there is no sidecar (a model saved by an older fluid).

    **Raises:**

    `CorruptModelError` if the sidecar exists but cannot be read.
    """
    path = Path(path)
    info_path = model_info_path(path)
    try:
        text = info_path.read_text()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
        ok = (
            isinstance(info, dict)
            and info.get("format") == MODEL_INFO_FORMAT
            and all(
                isinstance(info.get(key), int) and not isinstance(info.get(key), bool)
                for key in ("step", "bytes")
            )
            and isinstance(info.get("sha256"), str)
        )
    except ValueError:
        ok = False
    if not ok:
        raise CorruptModelError(
            f"{info_path}, which records the size and checksum of {path.name}, is unreadable "
            f"or of an unknown format; {_advice(path)}."
        )
    return info


class _LeafProblem(Exception):
    """Raised inside deserialisation, so the message can name the leaf; never escapes."""

    def __init__(self, message: str, *, fits: bool):
        super().__init__(message)
        # False: the file's layout differs from the skeleton's (another config), as opposed
        # to bytes that cannot be read at all.
        self.fits = fits


def _find_problem(error: BaseException) -> "_LeafProblem | None":
    # Equinox wraps a failure inside its tree map in its own errors; ours is in the chain.
    while error is not None:
        if isinstance(error, _LeafProblem):
            return error
        error = error.__cause__
    return None


def _is_stored(leaf: Any) -> bool:
    # The leaves `eqx.default_serialise_filter_spec` writes.
    return isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct, np.ndarray)) or (
        eqx.is_array_like(leaf)
    )


def load_model_file(path: str | os.PathLike, skeleton: Any) -> Any:
    """Read a model file `save_model_file` (or `eqx.tree_serialise_leaves`) wrote.

    If the sidecar exists, the file's size and SHA-256 are checked against it before any
    array is read. Each leaf is then read into the place of the skeleton's leaf of the same
    path, and must have its shape and dtype.

    **Arguments:**

    - `path`: the model file (`model.eqx`).
    - `skeleton`: a pytree of the saved model's structure, concrete or abstract (e.g. the
      model built from the run's config, or `eqx.filter_eval_shape` of it).

    **Returns:**

    The skeleton with its array leaves replaced by the saved ones (on the default device).

    **Raises:**

    - `MissingInputError` if neither the model file nor its sidecar exists.
    - `CorruptModelError` if the file is cut short, its contents changed since it was saved,
      it was saved from another model config (a leaf of another shape or dtype, fewer or more
      leaves) or it cannot be read; the message names the file and says what to do.
    """
    path = Path(path)
    info = read_model_info(path)
    advice = _advice(path)
    if not path.is_file():
        if info is None:
            raise MissingInputError(f"no saved model at {path}.")
        raise CorruptModelError(
            f"{path} is missing, though {model_info_path(path).name} beside it records it; "
            f"{advice}."
        )
    if info is not None:
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CorruptModelError(
                f"{path} is damaged: it has {size} bytes instead of the {info['bytes']} it was "
                f"saved with (cut short, or overwritten by an interrupted save); {advice}."
            )
        if file_digest(path) != info["sha256"]:
            raise CorruptModelError(
                f"{path} is damaged: its contents changed since it was saved (checksum "
                f"mismatch with {model_info_path(path).name}); {advice}."
            )

    names = iter(path_name(p) for p, _ in jtu.tree_flatten_with_path(skeleton)[0])

    def read_leaf(f: Any, like: Any) -> Any:
        name = next(names)
        if not _is_stored(like):
            return like
        try:
            leaf = eqx.default_deserialise_filter_spec(f, like)
        except Exception as e:
            raise _LeafProblem(f"reading {name} failed ({brief_error(e)})", fits=True) from e
        if isinstance(like, (jax.Array, jax.ShapeDtypeStruct, np.ndarray)) and (
            leaf.shape != like.shape or leaf.dtype != like.dtype
        ):
            raise _LeafProblem(
                f"{name} is {describe_array(leaf.shape, leaf.dtype)} in the file and "
                f"{describe_array(like.shape, like.dtype)} here",
                fits=False,
            )
        return leaf

    other_config = (
        "it was saved from another model config; build the model from the config it was "
        f"saved with, or {advice}"
    )
    with open(path, "rb") as f:
        try:
            model = eqx.tree_deserialise_leaves(f, skeleton, filter_spec=read_leaf)
            trailing = f.read(1)
        except Exception as e:
            problem = _find_problem(e)
            detail = str(problem) if problem is not None else brief_error(e)
            if problem is not None and not problem.fits:
                cause = other_config
            elif info is not None:
                # Size and checksum matched, so the file is whole: its layout is another's.
                cause = f"its size and checksum are as saved, so {other_config}"
            else:
                cause = (
                    "it is cut short or damaged, or was saved from another model config (it "
                    f"has no {model_info_path(path).name} to tell which); {advice}"
                )
            raise CorruptModelError(
                f"{path} does not load into this model: {detail}; {cause}."
            ) from e
    if trailing:
        raise CorruptModelError(
            f"{path} does not load into this model: it holds more arrays than this model "
            f"has; {other_config}."
        )
    return model
