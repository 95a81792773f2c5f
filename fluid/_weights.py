"""Pretrained weights without torch and without pickle: safetensors files and `config.json`.

The safetensors format is an 8-byte little-endian header length, a JSON header mapping each
tensor name to its dtype, shape and byte range, then the raw bytes. Reading it needs nothing
but NumPy, and nothing in it can execute code. `StateDict` hands tensors out by name and
checks their shapes, so a loader fails on the first missing or mis-shaped key with a message
naming it (and the closest names present), and can report keys it never used.
"""

import difflib
import json
import os
import struct
from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

from ._errors import UserError

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class WeightError(UserError, ValueError):
    """Weights that do not fit the model: a missing, mis-shaped or unused key, a bad file.

    A `UserError`: the `fluid` command prints its message alone (it names the file and what
    is wrong) and exits with status 2."""


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one `.safetensors` file, as NumPy arrays (little-endian, copied)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise WeightError(f"{path}: not a safetensors file (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise WeightError(f"{path}: header of {n} bytes runs past the end of the file; "
                          "is the file truncated?")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightError(f"{path}: unreadable safetensors header ({e})") from None
    body = memoryview(data)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise WeightError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which fluid "
                              f"does not read (known: {', '.join(_DTYPES)})")
        dtype = _DTYPES[info["dtype"]].newbyteorder("<")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end > len(body) or end - start != dtype.itemsize * int(np.prod(shape)):
            raise WeightError(f"{path}: tensor {name!r} of shape {shape} does not fit bytes "
                              f"[{start}, {end}) of a {len(body)}-byte body; is the file "
                              "truncated?")
        out[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(shape).copy()
    return out


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` as one `.safetensors` file (readable by `safetensors` and diffusers)."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset, blobs = 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name]))
        if a.dtype not in _NAMES:
            raise WeightError(f"tensor {name!r}: dtype {a.dtype} has no safetensors name")
        raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the body to 8 bytes
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for raw in blobs:
            f.write(raw)
    os.replace(tmp, path)  # never a half-written file under the real name


# The configuration file of a Hugging Face or diffusers folder.
HF_CONFIG = "config.json"


def read_config(folder: str | os.PathLike, name: str = HF_CONFIG) -> dict:
    """The JSON config of a Hugging Face-format folder."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise WeightError(f"{folder}: no {name}; a Hugging Face-format folder holds "
                          f"{name} and *.safetensors")
    with open(path) as f:
        return json.load(f)


def read_folder_weights(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a folder's `*.safetensors` files (one file, or shards with an index).

    `.bin`/`.pt` files are pickles and are refused: convert them to safetensors first.
    """
    folder = os.fspath(folder)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        pickles = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        hint = (f" It has {', '.join(pickles)}: pickled torch files are never loaded (they can "
                "run code); save them as safetensors first (an LDM/MAR autoencoder: "
                "fluid.tokenizers.convert_ldm_checkpoint).") if pickles else ""
        raise WeightError(f"{folder}: no *.safetensors file.{hint}")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        for k, v in read_safetensors(os.path.join(folder, f)).items():
            if k in tensors:
                raise WeightError(f"{folder}: tensor {k!r} appears in more than one file")
            tensors[k] = v
    return tensors


class StateDict:
    """Named tensors handed out once each, with shape checks and a record of what was used.

    **Arguments:**

    - `tensors`: name to array.
    - `source`: where they came from, for messages (a folder or file path).
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str = "weights"):
        self.tensors = dict(tensors)
        self.source = source
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str, shape: Iterable[int] | None = None) -> np.ndarray:
        """The tensor `key`, checked against `shape` when given; marks it used."""
        if key not in self.tensors:
            close = difflib.get_close_matches(key, self.tensors, n=3, cutoff=0.6)
            hint = f" Closest present: {', '.join(close)}." if close else ""
            raise WeightError(f"{self.source}: missing key {key!r}.{hint} The checkpoint does "
                              "not match this architecture or config.")
        value = self.tensors[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise WeightError(f"{self.source}: key {key!r} has shape {tuple(value.shape)}, the "
                              f"model expects {tuple(shape)}; is config.json the one these "
                              "weights were saved with?")
        self.used.add(key)
        return value

    def unused(self) -> list[str]:
        """Keys never taken, sorted."""
        return sorted(set(self.tensors) - self.used)

    def finish(self, ignore: Iterable[str] = ()) -> None:
        """Raise if any key other than those in `ignore` (exact names) was never used."""
        left = [k for k in self.unused() if k not in set(ignore)]
        if left:
            more = f" and {len(left) - 5} more" if len(left) > 5 else ""
            raise WeightError(f"{self.source}: {len(left)} unused keys ({', '.join(left[:5])}"
                              f"{more}); the checkpoint has parts this model does not.")
