"""Shared pieces of the benchmark scripts: conditions of a run, timing, JSON output, and the
reference configurations of issue 6 (MAR's ablation sizes at 256 tokens of 16 channels).

Every figure is a median over timed runs after warm-up, and every JSON records the machine,
the jax version, the load average at the start and the end, and the settings.
"""

import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from fluid.config import ComponentSpec, ModelConfig
from fluid.presets import get_config

RESULTS = Path(__file__).resolve().parent / "results"


def conditions() -> dict:
    """The machine and software a figure was measured on, and the load at this moment."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "jax_version": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "loadavg_start": list(os.getloadavg()),
    }


def finish(info: dict) -> dict:
    """`info` with the load average at the end of the run."""
    info["loadavg_end"] = list(os.getloadavg())
    return info


def median_time(fn: Callable[[], object], *, warmup: int, runs: int) -> tuple[float, list[float]]:
    """Median wall time of `fn()` (which must block until its result is ready) over `runs`
    calls after `warmup` untimed ones, and every timed figure."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def replace_fields(tree: Any, cls: type | tuple[type, ...], **changes: Any) -> Any:
    """`tree` with every module of type `cls` in it (at any depth, in any tree of modules:
    a model, a partition of one, a training state) given the field values `changes`,
    static fields included: `replace_fields(model, (TransformerStack, DiffusionHead),
    remat=None)` is the model built with `remat=None` everywhere.

    The modules are rebuilt as Equinox unflattens them (`object.__new__`, then every field
    set), so no constructor and no `__check_init__` runs: give only values the constructor
    would have accepted.
    """
    def replace(module):
        new = object.__new__(type(module))
        for field in dataclasses.fields(module):
            if field.name in changes:
                value = changes[field.name]
            else:  # a `cls` module may hold more of them
                value = replace_fields(getattr(module, field.name), cls, **changes)
            object.__setattr__(new, field.name, value)
        return new

    def is_target(x):
        return isinstance(x, cls)

    return jax.tree.map(lambda x: replace(x) if is_target(x) else x, tree, is_leaf=is_target)


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def read_peak(backend: str | None = None) -> dict | None:
    """The figures of `benchmarks/peak.py` for this backend, or None if it was not run."""
    path = RESULTS / f"peak_{backend or jax.default_backend()}.json"
    return json.loads(path.read_text()) if path.exists() else None


# MAR's tokens: 256 of 16 channels (its 16x, 16-channel KL autoencoder at 256 px, patch 1).
# The `kl` tokenizer built at 32 px with its tiny default encoder (2x downsampling) and 16
# latent channels has exactly this token grid; benchmarks feed tokens directly (the
# batch's `tokens`), so the autoencoder itself never runs in a timed step.
MAR_TOKENIZER = ComponentSpec(
    name="kl", kwargs={"image_size": 32, "patch_size": 1, "latent_channels": 16}
)


def reference_model(width: int, depth: int, *, head_width: int | None = None,
                    head_depth: int = 3, batch_mul: int = 4,
                    variant: str = "fluid") -> ModelConfig:
    """MAR's ablation sizes (issue 6) as a fluid model: 256 tokens of 16 channels, a backbone
    of `width` and `depth` blocks (MAR's encoder and decoder blocks together), attention
    heads of width 64, a `head_depth x head_width` diffusion head (`head_width` defaults to
    `width`), and a small text side (a learned encoder of width 128 and one aligner block
    over 16 text tokens) standing in for MAR's class embedding.

    `variant`: `"fluid"` (random order, bidirectional), `"continuous-raster"` (raster
    order, causal backbone with a KV cache) or `"continuous-arpg"` (random order, the
    `arpg` backbone: causal with position queries and a KV cache, `depth // 2` query
    blocks).
    """
    random = variant in ("fluid", "continuous-arpg")
    backbone = {"fluid": "bidirectional", "continuous-arpg": "arpg"}.get(variant, "causal")
    return ModelConfig(
        tokenizer=MAR_TOKENIZER,
        head=ComponentSpec(name="diffusion", kwargs={"width": head_width or width,
                                                     "depth": head_depth,
                                                     "batch_mul": batch_mul}),
        order=ComponentSpec(name="random" if random else "raster"),
        backbone=ComponentSpec(name=backbone, kwargs={"depth": depth, "num_heads": width // 64}),
        text_encoder=ComponentSpec(name="learned", kwargs={"dim": 128, "depth": 1,
                                                           "num_heads": 2}),
        width=width, aligner_depth=1, aligner_heads=width // 64, text_len=16,
        text_vocab_size=128,
    )


# Named configurations: `mar512` is the MFU target of issue 6 (MAR's 4 + 4 blocks at width
# 512, head 3 x 512, batch multiplier 4); `mar256` its smaller sibling (4 blocks at 256, as
# MAR's 2 + 2), which is also the sampling reference. The issue gives no head size at width
# 256; 3 x 256 is the one that makes its two MAR figures agree on one machine peak (about
# 70 GFLOP/s by MAR's own FLOPs: see benchmarks/README.md), and 3 x 512 would need more
# than that peak to sample 4 images in 21.9 s.
REFERENCES: dict[str, Callable[[str], ModelConfig]] = {
    "mar512": lambda v: reference_model(512, 8, variant=v),
    "mar256": lambda v: reference_model(256, 4, variant=v),
}


def model_config(name: str, variant: str = "fluid") -> ModelConfig:
    """A reference configuration of `REFERENCES`, or the model of a preset of
    `fluid.presets` (`tiny-fluid`, `shapes-continuous-raster`, ...)."""
    if name in REFERENCES:
        return REFERENCES[name](variant)
    return get_config(name).model
