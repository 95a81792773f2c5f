"""Sampling throughput per variant, and the head evaluations per image counted as they run.

    python benchmarks/sampling.py                       # mar256, random and raster order
    python benchmarks/sampling.py --config mar256 --variants fluid --batch 4 --runs 2
    python benchmarks/sampling.py --config tiny-fluid tiny-continuous-raster tiny-discrete-raster

Issue 6's reference: MAR's own sampler at width 256, 2 + 2 blocks, batch 4, 16 steps,
guidance 3 (linear), 100 diffusion steps: 21.9 s for 4 images (0.18 images/s) on a 2-core
CPU; the target is 5x its images/s. `mar256` is that model (4 blocks at width 256, 256
tokens of 16 channels, head 3 x 256); `--config` also takes preset names.

For each configuration: the jitted `FluidModel.generate` (the whole loop: text, backbone,
head, decoding) is lowered and compiled once (`lower_s`, `compile_s`), then timed over
`--runs` calls after `--warmup` (`sample_s_median`, `images_per_s`). Head evaluations are
counted by a copy of the model whose head's last layer reports, through a host callback,
how many rows it sees (`head_evals_counted`); the expected count is
`tokens x head.num_evaluations() x (2 with guidance)` per image. `time_head_only_s` and
`time_backbone_only_s` time the two parts alone, batched as in the loop, to show where the
time goes. FLOPs are matmul FLOPs from `benchmarks/flops.py`. `--profile` runs one more
call under `jax.profiler` and records its operation time by kind, by part (text, backbone,
head, tokenizer) and by JAX operation (`benchmarks/_profile.py`).
"""

import argparse
import dataclasses
import itertools
import json
import sys
import time
import typing
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REFERENCES,
    RESULTS,
    conditions,
    finish,
    median_time,
    model_config,
    read_peak,
    write_json,
)
from _profile import print_profile, profile_call
from flops import sample_flops, token_grid

from fluid.backbones import AbstractBidirectionalBackbone, AbstractCausalBackbone
from fluid.build import compose
from fluid.config import ModelConfig
from fluid.heads import DiffusionHead, SoftmaxHead
from fluid.model import FluidModel

MAR_REFERENCE = {"config": "mar256", "batch": 4, "steps": 16, "cfg": 3.0, "seconds": 21.9}


def build(config: ModelConfig, *, seed: int = 0) -> FluidModel:
    """The model of `config` with random weights; the empty caption is id 1, a palette
    tokenizer is fitted to random images."""
    null_ids = np.zeros((config.text_len,), np.int32)
    null_ids[0] = 1
    null_mask = np.arange(config.text_len) < 1
    fit = None
    if config.tokenizer.name == "palette":
        size = config.tokenizer.kwargs["image_size"]
        fit = np.random.default_rng(seed).uniform(-1, 1, (32, size, size, 3)).astype(np.float32)
    return compose(config, text_vocab_size=config.text_vocab_size,
                   null_text=(null_ids, null_mask), key=jr.key(seed), fit_images=fit)


def captions(config: ModelConfig, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random captions of 6 tokens, padded to `text_len`."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, config.text_vocab_size, (batch, config.text_len)).astype(np.int32)
    mask = np.broadcast_to(np.arange(config.text_len) < min(6, config.text_len), ids.shape)
    return np.where(mask, ids, 0).astype(np.int32), np.ascontiguousarray(mask)


class HeadCounter:
    """A host-side tally of the rows a head's last layer computes."""

    def __init__(self):
        self.rows = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # Under `vmap_method="expand_dims"` the callback gets every batch axis at once.
        self.rows += int(np.prod(x.shape[:-1]))
        return np.zeros(x.shape[:-1], np.float32)


@typing.final
class CountingLinear(eqx.Module):
    """A linear layer that reports how many rows it computes to a `HeadCounter`.

    Its output feeds (times zero) into the layer's input, so the callback can neither be
    removed as dead code nor moved out of the sampling loops.
    """

    linear: eqx.nn.Linear
    counter: HeadCounter = eqx.field(static=True)

    @property
    def weight(self):
        return self.linear.weight

    def __call__(self, x):
        seen = jax.pure_callback(self.counter, jax.ShapeDtypeStruct((), jnp.float32), x,
                                 vmap_method="expand_dims")
        return self.linear(x + 0 * seen.astype(x.dtype))


def counting_model(model: FluidModel) -> tuple[FluidModel, HeadCounter]:
    """`model` with its head's last layer counting rows: one row is one evaluation of the
    head's network on one token (the diffusion head's `final_linear`, after which the
    conditional and unconditional halves of guidance are separate rows; the softmax
    head's `proj`)."""
    counter = HeadCounter()
    if isinstance(model.head, DiffusionHead):
        layer = "final_linear"
    elif isinstance(model.head, SoftmaxHead):
        layer = "proj"
    else:
        raise NotImplementedError(f"no counter for {type(model.head).__name__}")

    def where(m):
        return getattr(m.head, layer)

    return eqx.tree_at(where, model, CountingLinear(where(model), counter)), counter


def generate_fn(model: FluidModel, *, steps: int, cfg: float, temperature: float = 1.0):
    """A jitted `(params, ids, mask, key) -> images` for `model`'s structure."""
    params, static = eqx.partition(model, eqx.is_array)

    @jax.jit
    def generate(params, ids, mask, key):
        return eqx.combine(params, static).generate(ids, mask, key=key, steps=steps, cfg=cfg,
                                                    temperature=temperature)

    return generate, params


def time_parts(model: FluidModel, batch: int, *, steps: int, cfg: float, warmup: int,
               runs: int) -> dict:
    """The head alone on every token of `batch` images in one batched call, and the backbone
    alone over the sampling loop's passes (per step, a bidirectional backbone's conditions at
    that step's positions; one cached position per token for a causal one), both with
    guidance's halves."""
    n, dim = model.seq_len, model.backbone.dim
    halves = 2 if cfg != 1.0 else 1
    keys = jr.split(jr.key(0), batch * n)
    z = jr.normal(jr.key(1), (halves, batch * n, dim))

    @jax.jit
    def head_only(head, z, keys):
        if halves == 2:
            return jax.vmap(lambda c, u, k: head.sample(c, u, cfg, 1.0, key=k))(z[0], z[1], keys)
        return jax.vmap(lambda c, k: head.sample(c, None, 1.0, 1.0, key=k))(z[0], keys)

    head_s, _ = median_time(lambda: head_only(model.head, z, keys).block_until_ready(),
                            warmup=warmup, runs=runs)
    backbone = model.backbone
    x = jr.normal(jr.key(2), (batch * halves, n, dim))
    ctx = jr.normal(jr.key(3), (batch * halves, model.null_ids.shape[0], dim))
    ctx_mask = jnp.ones(ctx.shape[:2], bool)
    if isinstance(backbone, AbstractCausalBackbone):
        @jax.jit
        def backbone_only(backbone, x, ctx, ctx_mask):
            def one(x, ctx, ctx_mask):
                cache = backbone.init_cache(ctx, ctx_mask)

                def body(cache, t):
                    z, cache = backbone.decode_step(x[t], t, cache, ctx, ctx_mask)
                    return cache, z

                return jax.lax.scan(body, cache, jnp.arange(n))[1]

            return jax.vmap(one)(x, ctx, ctx_mask)
    elif not isinstance(backbone, AbstractBidirectionalBackbone):
        # Any other backbone (`arpg`) through the loop's own calls: per step `decode` at
        # that step's positions and `observe` of the tokens written there, each example
        # under its `halves` contexts.
        x = x[:batch]
        ctx = ctx.reshape(batch, halves, *ctx.shape[1:])
        ctx_mask = ctx_mask.reshape(batch, halves, -1)

        @jax.jit
        def backbone_only(backbone, x, ctx, ctx_mask):
            def one(x, ctx, ctx_mask):
                state = backbone.init_decode(ctx, ctx_mask)
                start = 0
                for k, group in itertools.groupby(model.order.step_counts(n, steps)):
                    def body(carry, i, k=k, start=start):
                        h, state = carry
                        positions = start + i * k + jnp.arange(k)
                        z, state = backbone.decode(state, h, lambda v: v, positions, ctx,
                                                   ctx_mask)
                        h = h.at[positions].add(1e-3 * z[0])
                        return (h, backbone.observe(state, h, lambda v: v, positions, ctx,
                                                    ctx_mask)), None

                    length = len(list(group))
                    (x, state), _ = jax.lax.scan(body, (x, state), jnp.arange(length))
                    start += k * length
                return x

            return jax.vmap(one)(x, ctx, ctx_mask)
    else:
        @jax.jit
        def backbone_only(backbone, x, ctx, ctx_mask):
            # Every position known: with none known the backbone reads only its mask
            # embedding, its output does not depend on `h`, and XLA hoists the pass out of
            # the loop (a 16x underestimate).
            known = jnp.ones((n,), bool)
            # As the loop does: at each step the conditions of that step's positions only
            # (`at_positions`), steps of equal counts in one scan.
            for k, group in itertools.groupby(model.order.step_counts(n, steps)):
                positions = jnp.arange(k)

                def body(h, _, positions=positions):
                    # Each pass reads the last one's output: none can be hoisted out of the loop.
                    z = jax.vmap(backbone.at_positions, in_axes=(0, None, 0, 0, None))(
                        h, known, ctx, ctx_mask, positions
                    )
                    return h.at[:, positions].add(1e-3 * z), None

                x = jax.lax.scan(body, x, None, length=len(list(group)))[0]
            return x
    back_s, _ = median_time(
        lambda: backbone_only(backbone, x, ctx, ctx_mask).block_until_ready(),
        warmup=warmup, runs=runs,
    )
    return {"time_head_only_s": head_s, "time_backbone_only_s": back_s}


def run(name: str, variant: str | None, *, batch: int, steps: int, cfg: float, warmup: int,
        runs: int, count: bool, parts: bool, profile: bool = False) -> dict:
    info = conditions()
    config = model_config(name, variant or "fluid")
    model = build(config)
    seq_len, token_dim, vocab_size = token_grid(config)
    ids, mask = captions(config, batch)
    key = jr.key(1)
    steps = min(steps, seq_len)

    generate, params = generate_fn(model, steps=steps, cfg=cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = generate.lower(params, ids, mask, key)
    lower_s, lower_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    compile_s, compile_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    # A matmul timed right after every call gives the machine's speed at that moment.
    a = jr.normal(jr.key(2), (1024, 1024))
    matmul = jax.jit(lambda a: jnp.matmul(a, a, precision=jax.lax.Precision.HIGHEST))
    matmul(a).block_until_ready()
    for _ in range(warmup):
        compiled(params, ids, mask, key).block_until_ready()
    times, cpu_times, mm_times = [], [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        compiled(params, ids, mask, key).block_until_ready()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        mm_times.append(time.perf_counter() - t0)
    sample_s = float(np.median(times))
    interleaved_gflops = 2 * 1024**3 / float(np.median(mm_times)) / 1e9

    guided = cfg != 1.0
    expected = seq_len * model.head.num_evaluations() * (2 if guided else 1)
    counted = None
    if count:
        counting, counter = counting_model(model)
        gen_count, params_count = generate_fn(counting, steps=steps, cfg=cfg)
        gen_count(params_count, ids, mask, key).block_until_ready()
        counted = counter.rows / batch

    fl = sample_flops(config, seq_len=seq_len, token_dim=token_dim, steps=steps, guided=guided,
                      vocab_size=vocab_size)
    peak = read_peak()
    achieved = fl["total"] * batch / sample_s / 1e9
    result = {
        "config": name,
        "variant": variant,
        "model": dataclasses.asdict(config),
        "order": config.order.name,
        "batch_size": batch,
        "tokens_per_image": seq_len,
        "order_steps": steps if config.order.name == "random" else seq_len,
        "cfg": cfg,
        "diffusion_steps": getattr(model.head, "sampling_steps", None),
        "warmup": warmup,
        "runs": runs,
        "lower_s": lower_s,
        "lower_cpu_s": lower_cpu_s,
        "compile_s": compile_s,
        "compile_cpu_s": compile_cpu_s,
        "sample_s_median": sample_s,
        "sample_times": times,
        "sample_cpu_times": cpu_times,
        "images_per_s": batch / sample_s,
        "head_evals_expected": expected,
        "head_evals_counted": counted,
        "sample_flops_per_image": fl,
        "achieved_gflops": achieved,
        "peak_gflops_float32": peak["peak"]["float32"]["gflops"] if peak else None,
    }
    if result["peak_gflops_float32"]:
        result["fraction_of_peak"] = achieved / result["peak_gflops_float32"]
    result["interleaved_peak_gflops"] = interleaved_gflops
    result["fraction_of_interleaved_peak"] = achieved / interleaved_gflops
    ref = MAR_REFERENCE
    if (name, batch, steps, cfg) == (ref["config"], ref["batch"], ref["steps"], ref["cfg"]):
        mar_ips = ref["batch"] / ref["seconds"]
        result["mar_images_per_s"] = mar_ips
        result["speedup_vs_mar"] = result["images_per_s"] / mar_ips
    if parts:
        result.update(time_parts(model, batch, steps=steps, cfg=cfg, warmup=1, runs=runs))
    if profile:
        result.update(profile_call(lambda: compiled(params, ids, mask, key).block_until_ready(),
                                   compiled.as_text(), "/tmp/fluid-sampling-profile")[0])
    result["conditions"] = finish(info)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="*", default=["mar256"])
    parser.add_argument("--variants", nargs="*", default=["fluid", "continuous-raster"],
                        help="for the mar* configurations")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16, help="steps of the random order")
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-count", action="store_true", help="skip the counting run")
    parser.add_argument("--no-parts", action="store_true", help="skip head/backbone timings")
    parser.add_argument("--profile", action="store_true",
                        help="profile one call with jax.profiler: time by kind and by part")
    parser.add_argument("--out", default=str(RESULTS / "sampling.json"))
    args = parser.parse_args()
    jobs = [(name, v) for name in args.config
            for v in (args.variants if name in REFERENCES else [None])]
    results = [
        run(name, v, batch=args.batch, steps=args.steps, cfg=args.cfg, warmup=args.warmup,
            runs=args.runs, count=not args.no_count, parts=not args.no_parts,
            profile=args.profile)
        for name, v in jobs
    ]
    # Runs of other configurations already in the file are kept.
    keep = []
    if Path(args.out).exists():
        done = {(r["config"], r["variant"]) for r in results}
        keep = [r for r in json.loads(Path(args.out).read_text())["runs"]
                if (r["config"], r["variant"]) not in done]
    out = write_json(args.out, {"runs": keep + results})
    print(f"{'config':<26}{'batch':>6}{'sample s':>10}{'img/s':>8}{'vs MAR':>8}{'compile s':>10}"
          f"{'head evals/img':>16}{'counted':>10}{'GFLOP/s':>9}{'head s':>8}{'backbone s':>11}")
    for r in results:
        label = r["config"] + (f":{r['variant']}" if r["variant"] else "")
        speed = f"{r['speedup_vs_mar']:.2f}x" if "speedup_vs_mar" in r else "-"
        counted = f"{r['head_evals_counted']:.0f}" if r["head_evals_counted"] is not None else "-"
        print(f"{label:<26}{r['batch_size']:>6}{r['sample_s_median']:>10.2f}"
              f"{r['images_per_s']:>8.3f}{speed:>8}{r['compile_s']:>10.1f}"
              f"{r['head_evals_expected']:>16}{counted:>10}{r['achieved_gflops']:>9.1f}"
              f"{r.get('time_head_only_s', float('nan')):>8.2f}"
              f"{r.get('time_backbone_only_s', float('nan')):>11.2f}")
        c = r["conditions"]
        print(f"  load average {c['loadavg_start'][0]:.2f} -> {c['loadavg_end'][0]:.2f}, "
              f"{c['cpu_count']} CPUs, jax {c['jax_version']}")
        if "profiled_op_s" in r:
            print_profile(r)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
