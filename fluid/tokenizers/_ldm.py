"""Autoencoder checkpoints in LDM's layout, converted to folders the `kl` tokenizer loads.

LDM's `AutoencoderKL` (CompVis latent-diffusion; MAR's models/vae.py is a copy, and Stable
Diffusion's original VAE files use it) names its parameters `encoder.down.{level}.block.{i}`,
`encoder.mid.attn_1`, `decoder.up.{level}...` (decoder levels numbered from the highest
resolution, the reverse of diffusers' up blocks), and keeps the attention projections as 1x1
convolutions. `ldm_to_diffusers` renames them to diffusers' layout, which fluid's `kl`
tokenizer reads; a level LDM lists in `attn_resolutions` becomes an `AttnDownEncoderBlock2D` /
`AttnUpDecoderBlock2D`. `convert_ldm_checkpoint` reads a `.ckpt`/`.pth` (with torch's
weights-only loader; torch is needed for that alone) or an LDM-layout `.safetensors` file and
writes a diffusers folder (`config.json` and safetensors) that fluid, and diffusers, load
without torch.
"""

import contextlib
import dataclasses
import inspect
import os
import pickle
import re
import shutil
import sys
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._errors import OutputExistsError
from .._weights import WeightError, read_safetensors, write_safetensors
from ._autoencoder import (
    ATTN_DOWN_BLOCK,
    ATTN_UP_BLOCK,
    DOWN_BLOCK,
    UP_BLOCK,
    WEIGHTS_NAME,
    downsampling,
    write_diffusers_config,
)
from ._kl import CLASS_NAME, KLTokenizer

# The autoencoder's own parameters; anything else in a checkpoint (LDM's `loss.*`
# discriminator and LPIPS, a diffusion model beside `first_stage_model.*`) is left out.
_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
           "nin_shortcut": "conv_shortcut"}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
              "proj_out": "to_out.0"}
_MID = {"block_1": ("resnets.0", _RESNET), "attn_1": ("attentions.0", _ATTENTION),
        "block_2": ("resnets.1", _RESNET)}
_LEVEL = re.compile(
    r"(?P<level>\d+)\.(?:(?P<kind>block|attn)\.(?P<index>\d+)\.(?P<layer>\w+)"
    r"|(?P<sample>downsample|upsample)\.conv)\.(?P<param>weight|bias)"
)


@dataclasses.dataclass(frozen=True)
class ConvertedCheckpoint:
    """What `convert_ldm_checkpoint` wrote.

    - `folder`: the diffusers folder (`config.json`, `diffusion_pytorch_model.safetensors`).
    - `config`: the `AutoencoderKL` config written there.
    - `prefix`: where the autoencoder sat in the checkpoint (`""`, `"first_stage_model."`).
    - `ignored`: tensors of the checkpoint left out (other parts, LDM's loss, `exclude`).
    """

    folder: str
    config: dict
    prefix: str
    ignored: tuple[str, ...]


def convert_ldm_checkpoint(
    checkpoint: str | os.PathLike,
    folder: str | os.PathLike,
    *,
    scaling_factor: float,
    shift_factor: float | None = None,
    norm_num_groups: int = 32,
    sample_size: int = 256,
    prefix: str | None = None,
    exclude: Sequence[str] = (),
) -> ConvertedCheckpoint:
    """Write an LDM-layout KL autoencoder checkpoint as a diffusers folder for `KLTokenizer`.

    The architecture (channels, residual blocks per level, latent channels, which levels and
    mid blocks have attention, whether `quant_conv`/`post_quant_conv` are there) is read from
    the checkpoint's tensors. The folder is checked by loading it as `KLTokenizer` does, and
    appears complete or not at all. Then `KLTokenizer(image_size=..., path=folder)` (or
    `KLTokenizer(**MAR_KL16, path=folder)` for MAR's kl16.ckpt) needs no torch.

    **Arguments:**

    - `checkpoint`: a `.ckpt`/`.pth`/`.pt`/`.bin` file saved by `torch.save` (read with
      `torch.load(weights_only=True)`; objects other than tensors and containers, such as a
      training run's callbacks or argument namespace, are read as inert placeholders and
      dropped, never constructed), or a `.safetensors` file in LDM's layout. The state dict
      may be the file's top level or nested under `state_dict` or `model` (Lightning's and
      MAR's checkpoints), and prefixed (`first_stage_model.` in Stable Diffusion's).
    - `folder`: the folder to write; must not exist yet (or be empty).
    - `scaling_factor`: the latent scale the checkpoint's users apply (it is not in the
      file): `MAR_SCALING_FACTOR` (0.2325) for MAR's kl16.ckpt, 0.18215 for Stable
      Diffusion 1.x/2.x's VAE.
    - `shift_factor`: the latent shift (`None`: none).
    - `norm_num_groups`: groups of every GroupNorm (not in the file; LDM always uses 32).
    - `sample_size`: the image size recorded in `config.json` (diffusers' `sample_size`).
    - `prefix`: where the autoencoder's keys start (`None`: found from the keys).
    - `exclude`: regular expressions of LDM names (after the prefix) to leave out, as if the
      checkpoint did not have them; e.g. `r"decoder\\.up\\.\\d+\\.attn\\."` to build the
      decoder MAR's code builds (its `Decoder` has no level attention, and it loads with
      `strict=False`, ignoring such keys).

    **Returns:**

    A `ConvertedCheckpoint`.

    **Raises:**

    `WeightError` naming the problem for a missing, empty, truncated or foreign file, a
    checkpoint without an LDM autoencoder, or one in a layout fluid does not implement;
    `OutputExistsError` (a `FileExistsError`) if `folder` is not empty.
    """
    source = os.fspath(checkpoint)
    folder = os.fspath(folder)
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise OutputExistsError(f"{folder}: exists and is not an empty folder; choose a new one.")
    state = _find_state_dict(_read_checkpoint(source), source)
    ldm, prefix, ignored = _autoencoder_keys(state, source, prefix)
    patterns = [re.compile(p) for p in exclude]
    excluded = [k for k in ldm if any(p.match(k) for p in patterns)]
    for k in excluded:
        del ldm[k]
    tensors = ldm_to_diffusers(ldm, source=source)
    config = diffusers_config(tensors, source=source, norm_num_groups=norm_num_groups)
    config.update(
        sample_size=sample_size,
        scaling_factor=float(scaling_factor),
        shift_factor=None if shift_factor is None else float(shift_factor),
    )
    tmp = f"{folder.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write_safetensors(os.path.join(tmp, WEIGHTS_NAME), tensors, {"format": "pt"})
        write_diffusers_config(tmp, CLASS_NAME, config)
        # Every tensor is taken by the tokenizer's loader with its shape checked, and none is
        # left over: the folder loads, or this raises naming the key.
        KLTokenizer(image_size=downsampling(config["block_out_channels"]), path=tmp)
        if os.path.isdir(folder):
            os.rmdir(folder)  # empty, checked above
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ConvertedCheckpoint(
        folder=folder,
        config=config,
        prefix=prefix,
        ignored=tuple(sorted(ignored + [prefix + k for k in excluded])),
    )


# -- names ---------------------------------------------------------------------------------------
def ldm_to_diffusers(
    state: Mapping[str, np.ndarray], *, source: str = "checkpoint"
) -> dict[str, np.ndarray]:
    """LDM autoencoder parameters (names without a prefix, torch layout) under diffusers'
    names, the attention projections' 1x1 convolution kernels as linear weights.

    **Raises:**

    `WeightError` listing names that are not parameters of an LDM `AutoencoderKL` as fluid
    implements it (a 3x3 `conv_shortcut`, a fused `qkv`, a time embedding).
    """
    levels = 1 + max(
        (int(m[1]) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.", k))), default=-1
    )
    out, unknown = {}, []
    for name, value in state.items():
        new = _diffusers_name(name, levels)
        if new is None:
            unknown.append(name)
            continue
        if ".attentions." in new and new.endswith(".weight") and value.ndim == 4:
            if value.shape[2:] != (1, 1):
                unknown.append(name)
                continue
            value = value.reshape(value.shape[:2])
        out[new] = value
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        diffusers = any(re.search(r"\.(down_blocks|up_blocks|mid_block)\.", k) for k in unknown)
        hint = (" They are in diffusers' layout already: load their folder (config.json and "
                "safetensors) with KLTokenizer(path=...)." if diffusers else "")
        raise WeightError(
            f"{source}: {len(unknown)} tensors are not parameters of LDM's AutoencoderKL as "
            f"fluid implements it ({', '.join(sorted(unknown)[:5])}{more}).{hint}"
        )
    return out


def _diffusers_name(name: str, levels: int) -> str | None:
    top, _, rest = name.partition(".")
    if top in ("quant_conv", "post_quant_conv"):
        return name if rest in ("weight", "bias") else None
    if top not in ("encoder", "decoder"):
        return None
    part, _, rest = rest.partition(".")
    if part in ("conv_in", "conv_out"):
        return name if rest in ("weight", "bias") else None
    if part == "norm_out":
        return f"{top}.conv_norm_out.{rest}" if rest in ("weight", "bias") else None
    if part == "mid":
        m = re.fullmatch(r"(\w+?)\.(\w+)\.(weight|bias)", rest)
        if m is None or m[1] not in _MID or m[2] not in _MID[m[1]][1]:
            return None
        sub, layers = _MID[m[1]]
        return f"{top}.mid_block.{sub}.{layers[m[2]]}.{m[3]}"
    blocks = {"encoder": ("down", "down_blocks", "downsample", "downsamplers.0.conv"),
              "decoder": ("up", "up_blocks", "upsample", "upsamplers.0.conv")}[top]
    m = _LEVEL.fullmatch(rest)
    if part != blocks[0] or m is None:
        return None
    level = int(m["level"])
    block = level if top == "encoder" else levels - 1 - level
    prefix = f"{top}.{blocks[1]}.{block}"
    if m["sample"] is not None:
        return f"{prefix}.{blocks[3]}.{m['param']}" if m["sample"] == blocks[2] else None
    kind, layers = ("resnets", _RESNET) if m["kind"] == "block" else ("attentions", _ATTENTION)
    if m["layer"] not in layers:
        return None
    return f"{prefix}.{kind}.{m['index']}.{layers[m['layer']]}.{m['param']}"


def diffusers_config(
    tensors: Mapping[str, np.ndarray], *, source: str = "checkpoint", norm_num_groups: int = 32
) -> dict[str, Any]:
    """The architecture part of a diffusers `AutoencoderKL` config, read from parameters
    under diffusers' names (as `ldm_to_diffusers` gives them)."""

    def shape(name: str) -> tuple[int, ...]:
        if name not in tensors:
            raise WeightError(f"{source}: no {name!r} (LDM: {_ldm_hint(name)}); the checkpoint "
                              "is not a complete LDM autoencoder.")
        return tuple(tensors[name].shape)

    def count(pattern: str) -> int:
        found = {int(m[1]) for k in tensors if (m := re.match(pattern, k))}
        if found != set(range(len(found))):
            raise WeightError(f"{source}: blocks {sorted(found)} are not numbered 0, 1, ...")
        return len(found)

    levels = count(r"encoder\.down_blocks\.(\d+)\.resnets\.0\.conv1\.weight$")
    if levels == 0:
        shape("encoder.down_blocks.0.resnets.0.conv1.weight")
    if count(r"decoder\.up_blocks\.(\d+)\.resnets\.0\.conv1\.weight$") != levels:
        raise WeightError(f"{source}: the decoder has not the encoder's {levels} levels.")
    channels = [shape(f"encoder.down_blocks.{i}.resnets.0.conv2.weight")[0]
                for i in range(levels)]
    latent = shape("decoder.conv_in.weight")[1]
    if shape("encoder.conv_out.weight")[0] != 2 * latent:
        raise WeightError(
            f"{source}: the encoder gives {shape('encoder.conv_out.weight')[0]} channels, not "
            f"a mean and a log-variance for the decoder's {latent} latent channels (fluid "
            "implements double_z=True, MAR's use_variational=True).")
    if "quant_conv.weight" in tensors and shape("quant_conv.weight")[0] != 2 * latent:
        raise WeightError(f"{source}: quant_conv gives {shape('quant_conv.weight')[0]} channels,"
                          f" not 2 x {latent} (MAR's use_variational=False is not implemented).")
    for name in ("encoder.conv_in.weight", "decoder.conv_out.weight"):
        if 3 not in shape(name)[:2]:
            raise WeightError(f"{source}: {name} has shape {shape(name)}; fluid implements "
                              "RGB images (3 channels).")
    mid = [f"{p}.mid_block.attentions.0.to_q.weight" in tensors for p in ("encoder", "decoder")]
    if mid[0] != mid[1]:
        raise WeightError(f"{source}: only one of the mid blocks has attention; diffusers' "
                          "mid_block_add_attention sets both.")
    bad = [c for c in channels if c % norm_num_groups]
    if bad:
        raise WeightError(f"{source}: channels {channels} are not multiples of "
                          f"norm_num_groups={norm_num_groups}; pass the groups it was built with.")

    def attention(part: str, i: int) -> bool:
        return f"{part}.{i}.attentions.0.to_q.weight" in tensors

    return {
        "block_out_channels": channels,
        "layers_per_block": count(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.conv1\.weight$"),
        "latent_channels": latent,
        "norm_num_groups": norm_num_groups,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": "quant_conv.weight" in tensors,
        "use_post_quant_conv": "post_quant_conv.weight" in tensors,
        "mid_block_add_attention": mid[0],
        "down_block_types": [ATTN_DOWN_BLOCK if attention("encoder.down_blocks", i)
                             else DOWN_BLOCK for i in range(levels)],
        "up_block_types": [ATTN_UP_BLOCK if attention("decoder.up_blocks", i)
                           else UP_BLOCK for i in range(levels)],
    }


def _ldm_hint(name: str) -> str:
    hints = {"decoder.conv_in": "decoder.conv_in", "encoder.conv_out": "encoder.conv_out",
             "encoder.down_blocks.0.resnets.0": "encoder.down.0.block.0"}
    return next((v + "..." for k, v in hints.items() if name.startswith(k)), name)


# -- files ---------------------------------------------------------------------------------------
def _autoencoder_keys(
    state: Mapping[str, Any], source: str, prefix: str | None
) -> tuple[dict[str, np.ndarray], str, list[str]]:
    """The autoencoder's tensors without their prefix, the prefix, and the names left out."""
    names = [k for k in state if isinstance(k, str)]
    if prefix is None:
        anchor = "encoder.conv_in.weight"
        found = sorted(
            p for p in (k[: -len(anchor)] for k in names if k.endswith(anchor))
            if (not p or p.endswith(".")) and p + "decoder.conv_in.weight" in state
        )
        if not found:
            shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
            raise WeightError(
                f"{source}: holds no LDM autoencoder (no encoder.conv_in.weight with a "
                f"decoder.conv_in.weight beside it, under any prefix); its {len(names)} keys "
                f"start {shown or '(none)'}."
            )
        if len(found) > 1:
            raise WeightError(f"{source}: holds autoencoders under prefixes {found}; pass "
                              "prefix= to choose one.")
        prefix = found[0]
    ldm, ignored = {}, []
    for k in names:
        value = state[k]
        rest = k[len(prefix):]
        if k.startswith(prefix) and rest.startswith(_PARTS) and _is_array(value):
            ldm[rest] = _to_numpy(value)
        else:
            ignored.append(k)
    if not ldm:
        raise WeightError(f"{source}: no autoencoder tensors under prefix {prefix!r}.")
    return ldm, prefix, ignored


def _find_state_dict(obj: Any, source: str) -> Mapping[str, Any]:
    """The mapping of names to tensors: the object itself, or under `state_dict` / `model`
    (as often as they nest)."""
    path = []
    while isinstance(obj, Mapping):
        if any(_is_array(v) for v in obj.values()):
            return obj
        inner = next((k for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)),
                     None)
        if inner is None:
            break
        path.append(inner)
        obj = obj[inner]
    where = "".join(f"[{p!r}]" for p in path) or "its top level"
    keys = list(obj)[:8] if isinstance(obj, Mapping) else None
    raise WeightError(
        f"{source}: no state dict (names to tensors) at {where}"
        + (f", which holds {keys}" if keys is not None else f", a {type(obj).__name__}")
        + "; fluid looks in the top level and under 'state_dict' or 'model'."
    )


def _is_array(value: Any) -> bool:
    torch = sys.modules.get("torch")  # a torch tensor exists only if torch read the file
    return isinstance(value, np.ndarray) or (
        torch is not None and isinstance(value, torch.Tensor)
    )


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value.astype(np.float32)
    return value.detach().cpu().float().numpy()


def _read_checkpoint(path: str) -> Any:
    if path.endswith(".safetensors"):
        _check_file(path)
        return read_safetensors(path)
    return read_torch_checkpoint(path)


def _check_file(path: str) -> int:
    """The size of the file at `path`; `WeightError` if it is missing or empty."""
    if not os.path.isfile(path):
        raise WeightError(f"{path}: no such file.")
    size = os.path.getsize(path)
    if size == 0:
        raise WeightError(f"{path}: the file is empty; is the download incomplete?")
    return size


def read_torch_checkpoint(path: str | os.PathLike) -> Any:
    """What `torch.save` wrote to `path`, read with `torch.load(weights_only=True)` on the
    CPU: tensors, containers and numbers; any other object the file names (a training run's
    callbacks, an `argparse.Namespace`, NumPy scalars) becomes an inert placeholder instead
    of being constructed, holding as attributes only the plain data the file gives it
    (`vars(checkpoint["args"])` reads a run's arguments). Nothing the file names is ever
    called. Needs torch, imported here only.

    The file is checked before torch reads it: a missing, empty or truncated file, or one
    that is not torch's (a web page saved under the checkpoint's name, random bytes), raises
    `WeightError` saying so. torch's zip archives are memory-mapped, so tensors the caller
    never uses (an optimiser's state) are not read from disk.
    """
    path = os.fspath(path)
    size = _check_file(path)
    with open(path, "rb") as f:
        head = f.read(16)
    zipped = head.startswith(b"PK\x03\x04")
    if zipped:
        if not zipfile.is_zipfile(path):
            raise WeightError(
                f"{path}: truncated: a torch.save file is a zip archive, and this one ({size} "
                "bytes) has lost its end (the archive's directory); download it again.")
    elif not head.startswith(b"\x80"):
        kind = ("a web page or XML document (a download link that returned a page?)"
                if head.lstrip().startswith(b"<") else f"a file starting {head[:8]!r}")
        raise WeightError(f"{path}: not a torch checkpoint (neither torch.save's zip archive "
                          f"nor a pickle): {kind}.")
    try:
        import torch
    except ImportError:
        raise WeightError(
            f"{path}: reading a pickled torch checkpoint needs torch (pip install torch); "
            "only the conversion needs it, the folder it writes loads without."
        ) from None
    serialization = torch.serialization
    scan = getattr(serialization, "get_unsafe_globals_in_checkpoint", None)
    allow = contextlib.nullcontext()
    # torch < 2.5 has neither; it reads with the plain weights-only loader.
    if scan is not None and hasattr(serialization, "safe_globals") and zipped:
        try:
            names = scan(path)
        except _LOAD_ERRORS as e:
            raise WeightError(f"{path}: not a readable torch.save archive ({_first_line(e)}); "
                              "is the file truncated or damaged?") from None
        allow = serialization.safe_globals([(_placeholder(name), name) for name in names])
    # Memory-mapping needs the zip format and torch >= 2.1.
    mmap = {"mmap": True} if zipped and "mmap" in inspect.signature(torch.load).parameters else {}
    try:
        with allow, warnings.catch_warnings():
            # A pickle protocol other than torch's own is read all the same.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, **mmap)
    except _LOAD_ERRORS as e:
        raise WeightError(_refusal(path, e)) from None


# What torch raises for a damaged, truncated or foreign file, or one the safe loader refuses.
_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, TypeError)


def _refusal(path: str, error: Exception) -> str:
    """Why torch's weights-only loader refused `path`, without its advice to load the file
    unsafely (which fluid never does)."""
    text = str(error)
    named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if named:
        return (f"{path}: refused: the file asks to call {named[1]}, and fluid reads torch "
                "files only with torch's weights-only loader, which runs nothing a file names "
                "(nothing of it was run). A genuine checkpoint in torch's old pickle format "
                "can be re-saved, where you trust it, with torch.save(state_dict, path).")
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    reason = detail[1].strip() if detail else _first_line(error)
    return (f"{path}: torch's weights-only loader could not read it ({type(error).__name__}: "
            f"{reason}); is the file truncated or not a torch checkpoint?")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _placeholder(name: str) -> type:
    """A class standing for the global `name`: calling or constructing it stores nothing,
    restoring it keeps the plain data the file gives as its state, and nothing of the file's
    or of the named class runs."""

    def ignore(self: Any, *args: Any, **kwargs: Any) -> None:
        del self, args, kwargs

    def keep(self: Any, state: Any) -> None:
        # The state was built by the weights-only loader (containers, numbers, strings,
        # tensors, placeholders): kept as plain attributes, read by no code of the class.
        if isinstance(state, dict) and all(isinstance(k, str) for k in state):
            self.__dict__.update(state)

    def new(cls: type, *args: Any, **kwargs: Any) -> Any:
        del args, kwargs
        return object.__new__(cls)

    module, _, qualname = name.rpartition(".")
    return type(qualname, (), {"__module__": module, "__new__": new, "__init__": ignore,
                               "__setstate__": keep})
