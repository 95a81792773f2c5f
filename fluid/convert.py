"""Pretrained checkpoints converted into folders that fluid reads without torch or pickle.

MAR's checkpoints (LTH14/mar, `checkpoint-last.pth`) are what `torch.save` wrote: a dict of
`model` (the state dict), `model_ema` (the same names, EMA values) and the training state
(`optimizer`, `epoch`, `scaler`, `args`). `convert_mar_checkpoint` reads one with torch's
weights-only loader (`fluid.tokenizers.read_torch_checkpoint`: nothing the file names is
run) and writes a folder of two files:

```
<folder>/
  config.json         what it is (format "fluid-mar"), which weights, MAR's architecture as
                      read from the tensors, the attention heads, MAR's run arguments, and
                      the size and SHA-256 of the weights file
  model.safetensors   the chosen state dict, float32, under MAR's own names
```

`read_mar_folder` reads such a folder back with NumPy alone, checked (another tool's folder,
a missing, cut or changed file is refused naming what is wrong), and
`fluid.build.load_mar(folder.tensors, **folder.load_kwargs)` makes the model's parts from it.
LDM-layout autoencoders (MAR's `kl16.ckpt`) convert with
`fluid.tokenizers.convert_ldm_checkpoint`; `fluid convert mar|ldm` runs both.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._errors import ConfigError, MissingInputError, OutputExistsError
from ._weights import WeightError, read_safetensors, write_safetensors
from .build import load_mar
from .tokenizers import read_torch_checkpoint

MAR_FORMAT = "fluid-mar"
MAR_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# The state dicts of a MAR checkpoint, raw and EMA (util/misc.py save_model).
MAR_WEIGHTS = ("model", "model_ema")
# MAR's released sizes (models/mar.py: mar_base, mar_large, mar_huge): width -> name, heads.
MAR_SIZES: dict[int, tuple[str, int]] = {768: ("MAR-B", 12), 1024: ("MAR-L", 16),
                                         1280: ("MAR-H", 16)}
_MAR_MODELS = {"mar_base": 768, "mar_large": 1024, "mar_huge": 1280}  # main_mar.py --model
# LDM-layout names MAR's autoencoder code leaves out: its `Decoder` has no attention in its
# levels and loads kl16.ckpt with `strict=False` (`convert_ldm_checkpoint`'s `exclude`).
MAR_DECODER_EXCLUDE = r"decoder\.up\.\d+\.attn\."
# main_mar.py's defaults, for a checkpoint without its `args`.
_DIFFUSION_BATCH_MUL = 4
_SAMPLING_STEPS = 100
# Tensors every MAR model has; their absence tells another model's state dict.
_ANCHORS = ("z_proj.weight", "class_emb.weight", "fake_latent", "encoder_pos_embed_learned",
            "encoder_norm.weight", "decoder_norm.weight", "diffusion_pos_embed_learned",
            "diffloss.net.cond_embed.weight")


@dataclasses.dataclass(frozen=True)
class MarFolder:
    """A MAR model's weights in the folder `convert_mar_checkpoint` writes.

    - `folder`: the folder.
    - `tensors`: MAR's state dict, float32 NumPy arrays under MAR's names.
    - `config`: its `config.json` (`weights`, `num_heads`, `architecture`, `mar_args`, ...).
    """

    folder: str
    tensors: dict[str, np.ndarray]
    config: dict[str, Any]

    @property
    def num_heads(self) -> int:
        return self.config["num_heads"]

    @property
    def load_kwargs(self) -> dict[str, Any]:
        """The arguments of `fluid.build.load_mar` besides the tensors:
        `load_mar(folder.tensors, **folder.load_kwargs)`."""
        return {"num_heads": self.num_heads, "batch_mul": self.config["batch_mul"],
                "sampling_steps": self.config["sampling_steps"], "source": self.folder}


def mar_architecture(tensors: Mapping[str, np.ndarray], *, source: str = "state dict"
                     ) -> dict[str, Any]:
    """MAR's sizes read from its state dict (as `fluid.build.load_mar` reads them): width,
    encoder and decoder depths, tokens, buffer, token channels, classes, MLP ratio, the
    diffusion head's width and depth, and the parameter count.

    **Raises:**

    `WeightError` for a state dict that is not MAR's (naming what it lacks and the keys it
    has), or one fluid's `MaskedAutoencoder` cannot hold (a decoder of another width).
    """
    missing = [k for k in _ANCHORS if k not in tensors]
    if missing:
        names = sorted(tensors)
        shown = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
        raise WeightError(
            f"{source}: not MAR's state dict (models/mar.py): no {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}; its {len(names)} tensors are "
            f"{shown or '(none)'}."
        )

    def shape(name: str) -> tuple[int, ...]:
        if name not in tensors:
            raise WeightError(f"{source}: no {name!r}; MAR's state dict is incomplete.")
        return tuple(tensors[name].shape)

    def count(pattern: str) -> int:
        n = 0
        while pattern.format(n) in tensors:
            n += 1
        return n

    width = shape("encoder_norm.weight")[0]
    if shape("decoder_norm.weight")[0] != width:
        raise WeightError(
            f"{source}: the decoder's width {shape('decoder_norm.weight')[0]} is not the "
            f"encoder's {width}; fluid's MaskedAutoencoder has one width (MAR's released "
            "models too)."
        )
    seq_len = shape("diffusion_pos_embed_learned")[1]
    depth = count("encoder_blocks.{}.norm1.weight")
    return {
        "width": width,
        "depth": depth,
        "decoder_depth": count("decoder_blocks.{}.norm1.weight"),
        "seq_len": seq_len,
        "buffer_size": shape("encoder_pos_embed_learned")[1] - seq_len,
        "token_dim": shape("z_proj.weight")[1],
        "num_classes": shape("class_emb.weight")[0],
        "mlp_ratio": shape("encoder_blocks.0.mlp.fc1.weight")[0] / width if depth else 4.0,
        "head_width": shape("diffloss.net.cond_embed.weight")[0],
        "head_depth": count("diffloss.net.res_blocks.{}.in_ln.weight"),
        "parameters": int(sum(int(np.prod(v.shape)) for v in tensors.values())),
    }


def convert_mar_checkpoint(
    checkpoint: str | os.PathLike,
    folder: str | os.PathLike,
    *,
    weights: str | None = None,
    num_heads: int | None = None,
) -> MarFolder:
    """Write MAR's checkpoint as a folder that `read_mar_folder` reads without torch.

    The folder is checked by loading it with `fluid.build.load_mar` (every tensor used,
    each of its part's shape) before it appears under its name: complete or not at all.

    **Arguments:**

    - `checkpoint`: a file `torch.save` wrote: MAR's `{"model": ..., "model_ema": ...,
      "optimizer": ..., "epoch": ..., "args": ...}` (any of the training state may be
      missing), or a bare state dict. Read with torch's weights-only loader.
    - `folder`: the folder to write; must not exist yet (or be empty).
    - `weights`: `"model"` (raw) or `"model_ema"` (EMA, what MAR evaluates with);
      `None`: `model_ema` if the checkpoint has it, else `model`.
    - `num_heads`: attention heads of the encoder and decoder, not recorded in the
      weights. `None`: MAR's for a released size, found from the run's `args.model` or
      the width (12 for MAR-B's 768, 16 for MAR-L's 1024 and MAR-H's 1280); any other
      width must be told.

    **Returns:**

    The written `MarFolder`; its `config["weights"]` says which state dict was taken and
    `config["num_heads_from"]` where the heads came from.

    **Raises:**

    `WeightError` for a missing, empty, truncated or foreign file, one torch's safe loader
    refuses, or a state dict that is not MAR's; `ConfigError` for a `weights` the file lacks
    or heads that are needed or do not divide the width; `OutputExistsError` if `folder` is
    not empty.
    """
    source, folder = os.fspath(checkpoint), os.fspath(folder)
    check_new_folder(folder)
    contents = read_torch_checkpoint(source)
    taken, state = _choose_weights(contents, source, weights)
    tensors = _as_numpy(state, f"{source} [{taken!r}]" if taken != "state_dict" else source)
    architecture = mar_architecture(tensors, source=source)
    args = _run_args(contents)
    heads, heads_from = _num_heads(architecture["width"], num_heads, args.get("model"))
    steps = str(args.get("num_sampling_steps", _SAMPLING_STEPS))
    config = {
        "format": MAR_FORMAT,
        "format_version": MAR_FORMAT_VERSION,
        "what": "the weights of a MAR model (Li et al. 2024, LTH14/mar models/mar.py) under "
                "MAR's names, written by `fluid convert mar`",
        "checkpoint": os.path.basename(source),
        "weights": taken,
        "epoch": contents.get("epoch") if isinstance(contents.get("epoch"), int) else None,
        "num_heads": heads,
        "num_heads_from": heads_from,
        "architecture": architecture,
        "batch_mul": int(args.get("diffusion_batch_mul", _DIFFUSION_BATCH_MUL)),
        # MAR also takes "ddim<n>" spacings, which fluid's head does not: its default then.
        "sampling_steps": int(steps) if steps.isdigit() else _SAMPLING_STEPS,
        "mar_args": args,
    }
    tmp = f"{folder.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        weights_path = os.path.join(tmp, WEIGHTS_NAME)
        write_safetensors(weights_path, tensors, {"format": "pt"})
        config["files"] = {WEIGHTS_NAME: {"bytes": os.path.getsize(weights_path),
                                          "sha256": _sha256(weights_path)}}
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=1)
        written = read_mar_folder(tmp)
        # Every tensor is taken by a part with its shape checked, and none is left over: the
        # folder loads, or this raises naming the key.
        load_mar(written.tensors, **written.load_kwargs)
        if os.path.isdir(folder):
            os.rmdir(folder)  # empty, checked above
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return MarFolder(folder=folder, tensors=written.tensors, config=written.config)


def read_mar_folder(folder: str | os.PathLike) -> MarFolder:
    """The weights and config of a folder `convert_mar_checkpoint` wrote; NumPy alone.

    **Raises:**

    `MissingInputError` if the folder does not exist; `WeightError` naming what is wrong
    for a folder of another tool (a diffusers or transformers folder, a fluid run), a
    missing or damaged `config.json`, a weights file that is missing, cut short or changed
    since it was written (its size and SHA-256 are in `config.json`), or tensors that do
    not match the architecture recorded.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise MissingInputError(f"{folder}: no such folder; `fluid convert mar CHECKPOINT.pth "
                                f"{folder}` writes one from MAR's checkpoint.")
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        pickles = sorted(f for f in os.listdir(folder)
                         if f.endswith((".pth", ".pt", ".ckpt", ".bin")))
        hint = (f" It holds {', '.join(pickles)}: convert MAR's checkpoint with `fluid convert "
                "mar CHECKPOINT.pth OUT/`." if pickles else "")
        raise WeightError(f"{folder}: no {CONFIG_NAME}, so not a folder `fluid convert mar` "
                          f"wrote.{hint}")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightError(f"{config_path}: not valid JSON ({e}); the file is damaged: convert "
                          "the checkpoint again.") from None
    if not isinstance(config, dict) or config.get("format") != MAR_FORMAT:
        raise WeightError(f"{folder}: not a MAR folder written by `fluid convert mar`: "
                          f"{_what_folder(config)}.")
    if config.get("format_version") != MAR_FORMAT_VERSION:
        raise WeightError(f"{config_path}: format version {config.get('format_version')!r}, "
                          f"this fluid reads version {MAR_FORMAT_VERSION}; convert the "
                          "checkpoint again with this fluid.")
    try:
        settings = {k: int(config[k]) for k in ("num_heads", "batch_mul", "sampling_steps")}
        recorded = dict(config["architecture"])
        size, digest = (config["files"][WEIGHTS_NAME][k] for k in ("bytes", "sha256"))
    except (KeyError, TypeError, ValueError) as e:
        raise WeightError(f"{config_path}: lacks {e} or has it malformed; the file is damaged: "
                          "convert the checkpoint again.") from None
    path = os.path.join(folder, WEIGHTS_NAME)
    again = "convert the checkpoint again"
    if not os.path.isfile(path):
        raise WeightError(f"{path}: missing ({CONFIG_NAME} beside it records it); {again}.")
    if os.path.getsize(path) != size:
        raise WeightError(f"{path}: damaged: {os.path.getsize(path)} bytes instead of the "
                          f"{size} it was written with (cut short?); {again}.")
    if _sha256(path) != digest:
        raise WeightError(f"{path}: damaged: its contents changed since it was written "
                          f"(SHA-256 differs from {CONFIG_NAME}'s); {again}.")
    tensors = read_safetensors(path)
    found = mar_architecture(tensors, source=path)
    differ = sorted(k for k in set(found) | set(recorded) if found.get(k) != recorded.get(k))
    if differ:
        k = differ[0]
        raise WeightError(f"{folder}: the tensors' {k} is {found.get(k)!r}, {CONFIG_NAME} says "
                          f"{recorded.get(k)!r}; the files do not belong together: {again}.")
    heads = settings["num_heads"]
    if heads < 1 or found["width"] % heads:
        raise WeightError(f"{config_path}: num_heads {heads} does not divide the width "
                          f"{found['width']}.")
    return MarFolder(folder=folder, tensors=tensors, config=config)


def is_mar_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder `convert_mar_checkpoint` wrote (its `config.json` says format
    "fluid-mar"); whether it is intact, `read_mar_folder` checks."""
    try:
        with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("format") == MAR_FORMAT


def check_new_folder(folder: str | os.PathLike) -> None:
    """Raise `OutputExistsError` unless `folder` is absent or an empty folder."""
    folder = os.fspath(folder)
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise OutputExistsError(f"{folder}: exists and is not an empty folder; choose a new "
                                "one (nothing is overwritten).")


# -- helpers -------------------------------------------------------------------------------------
def _keys(obj: Mapping) -> str:
    names = [repr(k) for k in obj]
    return ", ".join(names[:8]) + (" ..." if len(names) > 8 else "") if names else "no keys"


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")  # a torch tensor exists only if torch read the file
    return isinstance(value, np.ndarray) or (
        torch is not None and isinstance(value, torch.Tensor)
    )


def _choose_weights(contents: Any, source: str, weights: str | None) -> tuple[str, Mapping]:
    """Which state dict to take, and it: `model` or `model_ema` of MAR's checkpoint, or
    the file's top level (`"state_dict"`) when it is a bare state dict."""
    if weights is not None and weights not in MAR_WEIGHTS:
        raise ConfigError(f"weights must be one of {MAR_WEIGHTS}, got {weights!r}.")
    if not isinstance(contents, Mapping):
        kind = type(contents)
        raise WeightError(f"{source}: not a MAR checkpoint: it holds a "
                          f"{kind.__module__}.{kind.__qualname__}, MAR's is a dict with "
                          "'model' and 'model_ema' state dicts.")
    present = [k for k in MAR_WEIGHTS if isinstance(contents.get(k), Mapping)]
    if weights is not None:
        if weights not in present:
            other = [k for k in present if k != weights]
            hint = f"; take {other[0]!r} (--weights {other[0]})" if other else ""
            raise ConfigError(f"{source}: has no {weights!r} state dict (its keys: "
                              f"{_keys(contents)}){hint}.")
        return weights, contents[weights]
    if present:
        taken = "model_ema" if "model_ema" in present else "model"
        return taken, contents[taken]
    if contents and all(_is_tensor(v) for v in contents.values()):
        return "state_dict", contents
    raise WeightError(f"{source}: not a MAR checkpoint: no 'model' or 'model_ema' state dict "
                      f"(its keys: {_keys(contents)}).")


def _as_numpy(state: Mapping, source: str) -> dict[str, np.ndarray]:
    """The state dict as NumPy, floating point as float32; DDP's `module.` prefix dropped."""
    names = [k for k in state if isinstance(k, str)]
    if len(names) != len(state):
        raise WeightError(f"{source}: has keys that are not names: "
                          f"{[k for k in state if not isinstance(k, str)][:3]}.")
    strip = "module." if names and all(k.startswith("module.") for k in names) else ""
    out = {}
    for name in names:
        value = state[name]
        if not _is_tensor(value):
            raise WeightError(f"{source}: {name!r} is a {type(value).__name__}, not a tensor; "
                              "not MAR's state dict.")
        if not isinstance(value, np.ndarray):
            value = value.detach().cpu()
            value = (value.float() if value.is_floating_point() else value).numpy()
        if np.issubdtype(value.dtype, np.floating):
            value = value.astype(np.float32, copy=False)
        out[name[len(strip):]] = value
    return out


def _run_args(contents: Mapping) -> dict[str, Any]:
    """MAR's `args` (an `argparse.Namespace`, read as plain data) as JSON values."""
    state = getattr(contents.get("args"), "__dict__", None)
    if not isinstance(state, dict):
        return {}
    plain = (str, int, float, bool, type(None))

    def ok(v: Any) -> bool:
        return isinstance(v, plain) or (isinstance(v, (list, tuple)) and all(ok(x) for x in v))

    return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(state.items())
            if isinstance(k, str) and ok(v)}


def _num_heads(width: int, num_heads: int | None, model: Any) -> tuple[int, str]:
    if num_heads is not None:
        heads, why = int(num_heads), "given"
    elif _MAR_MODELS.get(model) == width:
        name, heads = MAR_SIZES[width]
        why = f"MAR's {name} (the checkpoint's args.model {model!r})"
    elif width in MAR_SIZES:
        name, heads = MAR_SIZES[width]
        why = f"MAR's {name}, by the width {width}"
    else:
        known = ", ".join(f"{n} {w}" for w, (n, _) in MAR_SIZES.items())
        raise ConfigError(
            f"the checkpoint's width {width} is none of MAR's released sizes ({known}), and "
            "the attention heads are not in the weights: give them (--num-heads N, "
            "num_heads=N), as the model was trained."
        )
    if heads < 1 or width % heads:
        raise ConfigError(f"num_heads must divide the width {width}, got {heads}.")
    return heads, why


def _what_folder(config: Any) -> str:
    if not isinstance(config, dict):
        return f"its {CONFIG_NAME} holds a {type(config).__name__}"
    if "_class_name" in config:
        return (f"a diffusers {config['_class_name']} folder (an autoencoder: the kl or vq "
                "tokenizer's path)")
    if "model_type" in config:
        return f"a transformers {config['model_type']} folder (a t5 text encoder's path)"
    if {"model", "data"} <= set(config):
        return "a fluid run (sample it with `fluid sample`)"
    return f"its {CONFIG_NAME} has format {config.get('format')!r}"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
