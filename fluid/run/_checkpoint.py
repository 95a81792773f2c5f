"""Checkpoints of a training state with Orbax: atomic, keep-last-K, restorable onto any mesh.

One checkpoint is a directory `<directory>/<step>/` holding three Orbax items:

- `state/`: every array leaf of the state, keyed by its dotted path name
  (`params.backbone.blocks.attn.qkv.weight`, `fluid.run.path_name`); a typed PRNG key is
  stored as its raw key data.
- `config/`: the resolved run config as JSON.
- `data_state/`: the data iterator's position as JSON.

and, written last, `fluid_commit.json`: the size and SHA-256 of every file of those items.
Orbax writes a step into a temporary directory and renames it when complete, so an interrupted
save leaves no step directory at all; the commit file also covers a crash between Orbax's rename
and our own bookkeeping, and lets `latest_step` notice files cut short or deleted afterwards (a
full disk, a partial copy) without reading any array. The digests catch what sizes cannot,
bytes changed in place; checking them is a pass over the checkpoint, so only `restore` and
`restore_leaves` (every file) and `saved_config` (the config's files) do. A commit file
written before digests existed (no `"sha256"` key) is checked by size alone.

Only this module knows Orbax; the trainer and `load_model` see `CheckpointManager`,
`check_config` and the two error types.
"""

import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from .._errors import UserError
from .._paths import named_leaves, path_name
from ._compat import CheckpointMismatchError, check_config
from ._integrity import brief_error, describe_array, file_digest

COMMIT_FILE = "fluid_commit.json"

_ITEMS = ("state", "config", "data_state")
# Orbax's temporary step directories end in this suffix plus a timestamp.
_TMP_SUFFIX = ".orbax-checkpoint-tmp"


class CheckpointCorruptError(UserError, OSError):
    """A checkpoint's files are missing, cut short, changed since they were saved, or cannot be
    read."""


# -- state leaves ---------------------------------------------------------------------------
def _is_array_like(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _is_key(x: Any) -> bool:
    return _is_array_like(x) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _array_leaves(tree: Any) -> dict[str, Any]:
    """`{dotted name: leaf}` for the array (or `ShapeDtypeStruct`) leaves of `tree`."""
    out = {}
    for name, leaf in named_leaves(tree):
        if not _is_array_like(leaf):
            continue
        if name in out:
            # Only possible when a dict key itself contains a dot.
            raise ValueError(f"two leaves of the state share the checkpoint name {name!r}.")
        out[name] = leaf
    return out


def _key_impl(like: Any) -> Any:
    if isinstance(like, jax.Array):
        return jax.random.key_impl(like)
    # `key_impl` takes no ShapeDtypeStruct; read it off a traced key of that abstract type.
    found = []
    jax.eval_shape(lambda k: found.append(jax.random.key_impl(k)), like)
    return found[0]


def _unwrap(stored: jax.Array, like: Any) -> jax.Array:
    """A restored array as the leaf `like` holds it (a typed key from its raw key data)."""
    return jax.random.wrap_key_data(stored, impl=_key_impl(like)) if _is_key(like) else stored


def _sharding_lookup(shardings: Any, like: dict[str, Any]) -> dict[str, jax.sharding.Sharding]:
    if isinstance(shardings, jax.sharding.Sharding):
        return {name: shardings for name in like}
    if shardings is None:
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        out = {}
        for name, leaf in like.items():
            own = getattr(leaf, "sharding", None)
            out[name] = own if isinstance(own, jax.sharding.Sharding) else default
        return out
    given = dict(
        named_leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    )
    missing = [name for name in like if not isinstance(given.get(name), jax.sharding.Sharding)]
    if missing:
        raise ValueError(
            f"`shardings` has no sharding for {missing[0]}"
            + (f" (and {len(missing) - 1} more leaves)" if len(missing) > 1 else "")
            + "; give a pytree of the state's structure with a Sharding per array leaf, or one "
            "Sharding for all."
        )
    return {name: given[name] for name in like}


# -- the manager ----------------------------------------------------------------------------
class CheckpointManager:
    """Saves and restores training states under one directory, one subdirectory per step.

    Saves are synchronous and atomic: a checkpoint counts only once it is complete (see
    `latest_step`). Restores place every array with a requested sharding, so a state saved
    on one mesh restores onto a mesh of another shape or onto one device.

    **Arguments:**

    - `directory`: where the step directories go (a local path or any path Orbax accepts,
      e.g. `gs://...`); created on the first save.
    - `keep`: how many of the newest checkpoints to keep; older ones are deleted after each
      save. `None` keeps all.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = 3):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be at least 1 (or None to keep all), got {keep}.")
        path = epath.Path(directory)
        # Orbax resolves step paths against the directory; a relative one breaks once the
        # working directory changes.
        self.directory = path if path.is_absolute() else epath.Path(os.path.abspath(path))
        self.keep = keep
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                # The commit file is written once Orbax has finished; an asynchronous save
                # would leave the newest checkpoint uncommitted until the next call.
                enable_async_checkpointing=False,
                # Readers (sampling from a running job) must not create or clean up anything.
                create=False,
            ),
            # Handlers named up front: a fresh manager (a resumed run) can then read the
            # metadata of checkpoints it did not write.
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "data_state": ocp.JsonCheckpointHandler(),
            },
        )

    # -- queries ----------------------------------------------------------------------------
    def step_directory(self, step: int) -> epath.Path:
        """The directory of the checkpoint of `step` (whether or not it exists)."""
        return self.directory / str(step)

    def _orbax_steps(self) -> list[int]:
        # Another process (the training job) may have saved since we last looked.
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def _read_commit(self, step: int) -> dict[str, Any] | str:
        """The commit file of `step`'s checkpoint, or why it cannot be had."""
        commit = self.step_directory(step) / COMMIT_FILE
        if not commit.exists():
            return f"it has no {COMMIT_FILE}, so its save never finished"
        try:
            content = json.loads(commit.read_text())
            ok = isinstance(content["files"], dict) and isinstance(
                content.get("sha256", {}), dict
            )
        except (ValueError, KeyError, TypeError):
            ok = False
        return content if ok else f"its {COMMIT_FILE} is unreadable"

    def _damage(self, step: int) -> str | None:
        """Why the checkpoint of `step` cannot be trusted, or `None` if it is complete.

        Sizes only: this runs for every step whenever the latest one is looked up.
        """
        root = self.step_directory(step)
        commit = self._read_commit(step)
        if isinstance(commit, str):
            return commit
        for rel, size in commit["files"].items():
            f = root / rel
            if not f.exists():
                return f"{rel} is missing"
            actual = f.stat().length
            if actual != size:
                return f"{rel} has {actual} bytes instead of {size}"
        return None

    def _verify(self, step: int, items: tuple[str, ...]) -> None:
        """Raise `CheckpointCorruptError` unless every file of `items` has its saved digest."""
        commit = self._read_commit(step)
        if isinstance(commit, str):
            raise CheckpointCorruptError(self._corrupt_message(step, commit))
        root = self.step_directory(step)
        for rel, digest in commit.get("sha256", {}).items():
            if rel.split("/", 1)[0] not in items:
                continue
            f = root / rel
            if not f.exists():
                raise CheckpointCorruptError(self._corrupt_message(step, f"{rel} is missing"))
            if file_digest(f) != digest:
                raise CheckpointCorruptError(self._corrupt_message(
                    step, f"{rel}: its contents changed since it was saved (checksum mismatch)"
                ))

    def all_steps(self) -> list[int]:
        """The steps of every complete checkpoint, oldest first.

        **Returns:**

        A list of ints; steps whose save was interrupted or whose files are damaged are left
        out.
        """
        return [s for s in self._orbax_steps() if self._damage(s) is None]

    def latest_step(self) -> int | None:
        """The newest step with a complete checkpoint, the one a resumed run continues from.

        A checkpoint is complete when Orbax has renamed its temporary directory into place
        (a crash before leaves only `<step>.orbax-checkpoint-tmp-*`, never listed), its
        `fluid_commit.json` exists (a crash between Orbax's rename and that file leaves a step
        without it) and every file it lists still has its recorded size (cut short or deleted
        files). Newer checkpoints that fail these checks are skipped with a warning; the next
        `save` at or before their step deletes them.

        Contents are not read here: a checkpoint whose bytes changed in place stays the latest,
        and `restore` refuses it with `CheckpointCorruptError`. A resumed run then stops with
        that message rather than falling back to an earlier step by itself, which would
        silently discard the steps since (and its next save would be refused anyway, the
        damaged checkpoint being newer and complete by size).

        **Returns:**

        The step, or `None` if the directory holds no complete checkpoint.
        """
        for step in reversed(self._orbax_steps()):
            damage = self._damage(step)
            if damage is None:
                return step
            warnings.warn(
                f"skipping checkpoint {self.step_directory(step)}: {damage}.", stacklevel=2
            )
        return None

    def saved_config(self, step: int | None = None) -> dict[str, Any]:
        """The config a checkpoint was saved with (of the latest step by default).

        The config's files are checked against their digests first (`CheckpointCorruptError`
        if they changed); the arrays are neither read nor checked.
        """
        step = self._resolve_step(step)
        self._verify(step, ("config",))
        return self._read(step, config=ocp.args.JsonRestore())["config"]

    # -- save -------------------------------------------------------------------------------
    def save(
        self, step: int, state: Any, *, config: dict[str, Any], data_state: dict[str, Any]
    ) -> epath.Path:
        """Write a checkpoint of `state` at `step`, then delete all but the newest `keep`.

        Every process of a multi-process run calls this with its shards of the same state.

        **Arguments:**

        - `step`: the training step the state is at; names the checkpoint directory.
        - `state`: any pytree (an `eqx.Module` such as `TrainState`); its array leaves are
          saved (`eqx.filter(state, eqx.is_array)`), typed PRNG keys included. Other leaves
          (static fields, Python numbers, `None`) are not: they come from the `state_like`
          given to `restore`.
        - `config`: the resolved run config, JSON-serialisable (`fluid.config.to_dict`).
        - `data_state`: the data iterator's position, JSON-serialisable.

        **Returns:**

        The checkpoint's directory.

        **Raises:**

        `ValueError` if a complete checkpoint exists at `step` or after it: a run that resumed
        from an earlier step would otherwise interleave two histories. Delete those step
        directories to branch from an earlier step.
        """
        for name, value in (("config", config), ("data_state", data_state)):
            try:
                json.dumps(value)
            except (TypeError, ValueError) as e:
                raise TypeError(f"{name} must be JSON-serialisable: {e}") from None
        arrays = {}
        for name, leaf in _array_leaves(state).items():
            if isinstance(leaf, jax.ShapeDtypeStruct):
                raise TypeError(f"cannot save {name}: it is abstract ({leaf}), not an array.")
            arrays[name] = jax.random.key_data(leaf) if _is_key(leaf) else leaf
        self._clear_way(step)
        # `force`: Orbax would otherwise skip, silently, any step at or before its newest.
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(arrays),
                config=ocp.args.JsonSave(config),
                data_state=ocp.args.JsonSave(data_state),
            ),
            force=True,
        )
        self._manager.wait_until_finished()
        self._commit(step)
        return self.step_directory(step)

    def _clear_way(self, step: int) -> None:
        """Remove what interrupted or damaged saves left at or after `step`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            for leftover in self.directory.glob(f"*{_TMP_SUFFIX}*"):
                leftover.rmtree()
        for other in self._orbax_steps():
            if other < step:
                continue
            if self._damage(other) is None:
                newer = [s for s in self.all_steps() if s >= step]
                raise ValueError(
                    f"{self.directory} already holds complete checkpoints at steps {newer}, "
                    f"at or after step {step}; resume from the latest one, or delete those "
                    "step directories to continue from an earlier step."
                )
            self._manager.delete(other)

    def _commit(self, step: int) -> None:
        root = self.step_directory(step)
        if jax.process_index() == 0:
            files, digests = {}, {}
            for item in _ITEMS:
                for dirpath, _, filenames in (root / item).walk():
                    for filename in filenames:
                        f = epath.Path(dirpath) / filename
                        rel = str(f.relative_to(root))
                        files[rel] = f.stat().length
                        digests[rel] = file_digest(f)
            # Digests beside the sizes rather than in their place: an older fluid reading this
            # checkpoint still finds `files` as it expects.
            commit = {"step": step, "files": files, "sha256": digests}
            # Write-then-rename, so a crash never leaves a partial commit file.
            tmp = root / f"{COMMIT_FILE}.tmp"
            tmp.write_text(json.dumps(commit, indent=1))
            tmp.replace(root / COMMIT_FILE)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"fluid checkpoint commit {step}")

    # -- restore ----------------------------------------------------------------------------
    def _resolve_step(self, step: int | None) -> int:
        if step is None:
            latest = self.latest_step()
            if latest is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}.")
            return latest
        if step not in self._orbax_steps():
            raise FileNotFoundError(
                f"no checkpoint of step {step} in {self.directory}; complete ones: "
                f"{self.all_steps()}."
            )
        damage = self._damage(step)
        if damage is not None:
            raise CheckpointCorruptError(self._corrupt_message(step, damage))
        return step

    def _corrupt_message(self, step: int, problem: str) -> str:
        earlier = [s for s in self.all_steps() if s < step]
        advice = (
            f"restore an earlier step ({', '.join(map(str, earlier))}) or delete it to resume "
            "from the latest complete one"
            if earlier
            else "no earlier complete checkpoint exists; delete it and start afresh"
        )
        return f"checkpoint {self.step_directory(step)} is damaged: {problem}; {advice}."

    def _read(self, step: int, **items: Any) -> Any:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            # Damage the file sizes did not reveal (checksums, unreadable metadata).
            raise CheckpointCorruptError(
                self._corrupt_message(step, f"reading it failed ({brief_error(e)})")
            ) from e

    def _saved_metadata(self, step: int) -> dict[str, Any]:
        try:
            metadata = self._manager.item_metadata(step)["state"]
            return dict(getattr(metadata, "tree", metadata))
        except Exception as e:
            raise CheckpointCorruptError(
                self._corrupt_message(step, f"reading its metadata failed ({brief_error(e)})")
            ) from e

    def _check_structure(
        self,
        step: int,
        target: dict[str, jax.ShapeDtypeStruct],
        *,
        saved: dict[str, Any] | None = None,
        under: tuple[str, ...] | None = None,
    ) -> None:
        # `under`: the name prefixes below which `target` must hold every saved leaf (`None`:
        # everywhere, as when `target` is the whole state); `saved`: the metadata, if read.
        saved = self._saved_metadata(step) if saved is None else saved
        where = f"checkpoint {self.step_directory(step)} does not fit this state"
        for name, want in target.items():
            if name not in saved:
                raise CheckpointMismatchError(
                    f"{where}: it has no {name} ({describe_array(want.shape, want.dtype)} here); "
                    "was it made with another model or optimiser?"
                )
            got = saved[name]
            if tuple(got.shape) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(
                want.dtype
            ):
                raise CheckpointMismatchError(
                    f"{where}: {name} is {describe_array(got.shape, got.dtype)} in the checkpoint "
                    f"and {describe_array(want.shape, want.dtype)} here; was it made with another "
                    "model config?"
                )
        extra = sorted(
            name for name in saved
            if name not in target
            and (under is None or any(name.startswith(f"{prefix}.") for prefix in under))
        )
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise CheckpointMismatchError(
                f"{where}: it has {extra[0]}{more}, which this state lacks; was it made with "
                "another model or optimiser?"
            )

    def saved_leaves(self, step: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        """The dotted names, shapes and dtypes of the arrays a checkpoint holds (of the
        latest step by default), read from its metadata; no array is read. A typed PRNG key
        is listed as its raw key data."""
        step = self._resolve_step(step)
        return {
            name: jax.ShapeDtypeStruct(tuple(meta.shape), np.dtype(meta.dtype))
            for name, meta in self._saved_metadata(step).items()
        }

    @staticmethod
    def _targets(
        like: dict[str, Any], placement: dict[str, jax.sharding.Sharding]
    ) -> dict[str, jax.ShapeDtypeStruct]:
        # What Orbax reads for each leaf: a typed key is stored as its raw key data.
        target = {}
        for name, leaf in like.items():
            stored = jax.eval_shape(jax.random.key_data, leaf) if _is_key(leaf) else leaf
            target[name] = jax.ShapeDtypeStruct(
                stored.shape, stored.dtype, sharding=placement[name]
            )
        return target

    def restore(
        self,
        state_like: Any,
        *,
        step: int | None = None,
        shardings: Any = None,
        config: dict[str, Any] | None = None,
    ) -> tuple[Any, dict[str, Any], int]:
        """Read a checkpoint back into the structure of `state_like`.

        **Arguments:**

        - `state_like`: a pytree of the saved state's structure, concrete or abstract (e.g.
          `jax.eval_shape` of the state's constructor). Its array leaves say which shape and
          dtype to expect; its other leaves are returned as they are.
        - `step`: which checkpoint; by default `latest_step()`.
        - `shardings`: where to place the arrays. A pytree of `state_like`'s structure with a
          `jax.sharding.Sharding` (e.g. `NamedSharding`) per array leaf, or one `Sharding`
          for all. The mesh may differ from the one the checkpoint was saved on. `None`: each
          leaf's own sharding where `state_like` is concrete (or an abstract leaf carries
          one), otherwise the first device.
        - `config`: this run's config as a dict; if given, it is checked against the saved one
          with `check_config` before any array is read.

        Before anything is read, every file of the checkpoint is checked against the SHA-256
        its commit file records: one more pass over the whole checkpoint, by every process.

        **Returns:**

        `(state, data_state, step)`: the restored state, the data iterator's position that was
        saved with it, and the step restored.

        **Raises:**

        - `FileNotFoundError` if there is no (complete) checkpoint to restore.
        - `CheckpointMismatchError` if the config differs, or a leaf is missing, extra or of
          another shape or dtype (naming its dotted path).
        - `CheckpointCorruptError` if the checkpoint's files are missing, cut short, changed
          since they were saved or unreadable: one message naming the checkpoint, the file and
          the earlier steps to restore instead.
        """
        step = self._resolve_step(step)
        self._verify(step, _ITEMS)
        if config is not None:
            saved = self._read(step, config=ocp.args.JsonRestore())["config"]
            check_config(saved, config, source=f"checkpoint {self.step_directory(step)}")
        like = _array_leaves(state_like)
        target = self._targets(like, _sharding_lookup(shardings, like))
        self._check_structure(step, target)
        restored = self._read(
            step, state=ocp.args.StandardRestore(target), data_state=ocp.args.JsonRestore()
        )
        arrays = restored["state"]
        flat, treedef = jtu.tree_flatten_with_path(state_like)
        leaves = []
        for path, leaf in flat:
            name = path_name(path)
            if name not in like:
                leaves.append(leaf)
            else:
                leaves.append(_unwrap(arrays[name], leaf))
        return jtu.tree_unflatten(treedef, leaves), restored["data_state"], step

    def restore_leaves(
        self,
        like: Mapping[str | tuple[str, ...], Any],
        *,
        step: int | None = None,
        sharding: jax.sharding.Sharding | None = None,
        complete: tuple[str, ...] = (),
    ) -> tuple[dict[str | tuple[str, ...], Any], int]:
        """Read some arrays of a checkpoint by name, leaving the others unread: a model's
        weights without the optimiser state, say (`fluid.run.load_model`).

        **Arguments:**

        - `like`: `{name: array or jax.ShapeDtypeStruct}` for the leaves to read, each
          saying which shape and dtype to expect; names as in `saved_leaves`. A key may be a
          tuple of names, of which the checkpoint holds one (a model's leaf is under its
          trained or its frozen name); a tuple none of which it holds is reported under
          its first name.
        - `step`: which checkpoint; by default `latest_step()`.
        - `sharding`: where to place every array; `None`: each leaf's own sharding where it
          has one, otherwise the first device.
        - `complete`: dotted prefixes (`"state.ema"`) below which `like` must name every
          array the checkpoint holds (what is read there is a whole subtree).

        Every file of the checkpoint is checked against its SHA-256 first, as `restore` does
        (the arrays of a checkpoint share files, so the unread ones cannot be told apart).

        **Returns:**

        `(arrays, step)`: an array for each key of `like`, and the step read.

        **Raises:**

        As `restore`, except that arrays the checkpoint holds beyond `like` are allowed
        outside the `complete` prefixes.
        """
        step = self._resolve_step(step)
        self._verify(step, _ITEMS)
        saved = self._saved_metadata(step)
        names = {}
        for key in like:
            options = (key,) if isinstance(key, str) else tuple(key)
            names[key] = next((n for n in options if n in saved), options[0])
        by_name = {names[key]: leaf for key, leaf in like.items()}
        target = self._targets(by_name, _sharding_lookup(sharding, by_name))
        self._check_structure(step, target, saved=saved, under=complete)
        # The manager's handler restores whole trees only; a tree handler of the same format
        # reads the `state` item partially (Orbax reads only the requested arrays).
        restore = ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        )
        try:
            with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
                arrays = reader.restore(self.step_directory(step) / "state", args=restore)
        except Exception as e:
            raise CheckpointCorruptError(
                self._corrupt_message(step, f"reading it failed ({brief_error(e)})")
            ) from e
        return {key: _unwrap(arrays[names[key]], leaf) for key, leaf in like.items()}, step

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Release Orbax's resources (threads); the manager is unusable afterwards."""
        self._manager.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
