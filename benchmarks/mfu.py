"""Train-step model FLOPs utilisation (MFU), compile time and throughput of one configuration.

    python benchmarks/mfu.py --config mar512 --steps 3     # issue 6's target: MFU >= 0.80
    python benchmarks/mfu.py --config mar256 --steps 5
    python benchmarks/mfu.py --config tiny-fluid --steps 20 --no-xla-flops   # compile time

`--config`: `mar512` (MAR's 4 + 4 blocks at width 512, head 3 x 512, batch multiplier 4,
256 tokens of 16 channels, batch 8), `mar256` (4 blocks at width 256), or any preset name
of `fluid.presets` (its model; batch from `--batch`, else the preset's).

The step is the `Trainer`'s own jitted step (AdamW, clipping, EMA, donation), fed tokens
directly (`batch["tokens"]`, random normal): the image tokenizer never runs. Figures:

- `analytic`: matmul FLOPs per step from the config (`benchmarks/flops.py`), per part;
- `xla_flops`: XLA's `cost_analysis()["flops"]` of the compiled step with every `lax.scan`
  unrolled (XLA counts a while loop's body once: the rolled program's figure is
  `xla_flops_rolled`), and the ratio to the analytic count;
- `step_s`: median step time over `--steps` after `--warmup`; images/s, tokens/s;
- `mfu = analytic train FLOPs / step_s / peak`, with the peak of
  `benchmarks/results/peak_<backend>.json` (`benchmarks/peak.py`) and, because a shared
  machine's speed drifts, with a peak measured by a matmul timed right after every step
  (`mfu_interleaved`), and per CPU-second of this process for both (`mfu_cpu_time`: the
  time other jobs hold the cores drops out);
- `lower_s`, `compile_s`: tracing and XLA compilation of the step (and `*_cpu_s`, the
  process's CPU time, which depends less on other jobs' load).
"""

import argparse
import contextlib
import dataclasses
import functools
import sys
import time
from pathlib import Path

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
from flops import hlo_dot_flops, token_grid, train_flops, train_products

from fluid.config import TrainConfig
from fluid.presets import get_config
from fluid.recipes import prepare
from fluid.train import Trainer, shard_batch


@contextlib.contextmanager
def unrolled_scans():
    """Every `jax.lax.scan` traced inside is fully unrolled (straight-line HLO), so that
    XLA's cost analysis counts every iteration; tracing caches are cleared on entry and
    exit so that no rolled trace is reused and no unrolled one leaks out."""
    scan = jax.lax.scan
    jax.clear_caches()
    jax.lax.scan = functools.partial(scan, unroll=True)
    try:
        yield
    finally:
        jax.lax.scan = scan
        jax.clear_caches()


def xla_flops(lowered, *, compile: bool = True) -> tuple[float, int | None]:
    """XLA's flop count of a lowered computation (after optimisation if `compile`), and
    the FLOPs of its dots alone (`flops.hlo_dot_flops`; None without `compile`)."""
    if not compile:
        return float(_cost(lowered)["flops"]), None
    compiled = lowered.compile()
    return float(_cost(compiled)["flops"]), hlo_dot_flops(compiled.as_text())[0]


def _cost(stage) -> dict:
    cost = stage.cost_analysis()
    return cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one per device


def time_products(products: list[dict], *, warmup: int, runs: int) -> dict:
    """Each distinct product shape alone, forward and both gradients (`value_and_grad` of
    `<x @ w, g>`), and the step time they add up to: what the matmuls of the step cost at
    their own shapes, with nothing else around them."""
    timed: dict[tuple, float] = {}
    rows = []
    for i, p in enumerate(products):
        shape = (p["batch"], p["m"], p["k"], p["n"])
        if shape not in timed:
            b, m, k, n = shape
            lead = (b,) if b > 1 else ()
            keys = jr.split(jr.key(i), 3)
            x = jr.normal(keys[0], (*lead, m, k))
            w = jr.normal(keys[1], (*lead, k, n))
            g = jr.normal(keys[2], (*lead, m, n))
            f = jax.jit(jax.value_and_grad(lambda x, w, g: jnp.vdot(x @ w, g), argnums=(0, 1)))
            timed[shape], _ = median_time(
                lambda f=f, x=x, w=w, g=g: jax.block_until_ready(f(x, w, g)),
                warmup=warmup, runs=runs,
            )
        flops = 3 * 2 * p["batch"] * p["m"] * p["k"] * p["n"]
        rows.append({**p, "train_s": timed[shape], "train_flops": flops,
                     "gflops": flops / timed[shape] / 1e9})
    predicted = sum(r["count"] * r["train_s"] for r in rows)
    flops = sum(r["count"] * r["train_flops"] for r in rows)
    return {"products": rows, "matmuls_alone_step_s": predicted,
            "matmuls_alone_gflops": flops / predicted / 1e9}


def time_components(model, batch: dict, *, warmup: int, runs: int) -> dict:
    """The backbone alone and the head's loss alone, forward and backward, on the step's
    shapes (every position known to the backbone; the head at every position)."""
    tokens = batch["tokens"]
    bsz, n = tokens.shape[:2]
    dim = model.backbone.dim
    ctx_len = batch["text_ids"].shape[1]
    x = jr.normal(jr.key(0), (bsz, n, dim))
    ctx = jr.normal(jr.key(1), (bsz, ctx_len, dim))
    known = jnp.ones((n,), bool)
    mask = batch["text_mask"]
    g = jr.normal(jr.key(2), (bsz, n, dim))

    @jax.jit
    def backbone(backbone, x, ctx, mask):
        def f(b):
            return jnp.vdot(jax.vmap(b, in_axes=(0, None, 0, 0))(x, known, ctx, mask), g)
        return jax.value_and_grad(f)(backbone)

    @jax.jit
    def head(head, z, tokens, key):
        keys = jr.split(key, (bsz, n))

        def f(h):
            return jnp.sum(jax.vmap(jax.vmap(lambda z, t, k: h.loss(z, t, key=k)))(z, tokens, keys))
        return jax.value_and_grad(f)(head)

    back_s, _ = median_time(lambda: jax.block_until_ready(backbone(model.backbone, x, ctx, mask)),
                            warmup=warmup, runs=runs)
    head_s, _ = median_time(lambda: jax.block_until_ready(head(model.head, x, tokens, jr.key(3))),
                            warmup=warmup, runs=runs)
    return {"backbone_alone_s": back_s, "head_alone_s": head_s}


def make_trainer(name: str, *, batch: int | None, precision: str, variant: str):
    """The `Trainer` of configuration `name` (see the module docstring) and its batch size."""
    model = model_config(name, variant)
    if name in REFERENCES:
        batch = batch or 8
        base = TrainConfig(model=model, batch_size=batch, steps=1000)
    else:
        base = get_config(name)
        batch = batch or base.batch_size
    image_size = model.tokenizer.kwargs.get("image_size", 32)
    config = dataclasses.replace(
        base,
        model=model,
        batch_size=batch,
        precision=precision,
        # A few images for fitting a palette; the data only supplies captions here.
        data=dataclasses.replace(base.data, image_size=image_size, fit_images=64),
    )
    return prepare(config, progress=False).trainer, config


def make_batch(trainer: Trainer, config: TrainConfig, seq_len: int, token_dim: int,
               vocab_size: int | None, seed: int) -> dict:
    """A training batch of random tokens and the loader's captions."""
    loaded = next(trainer.loader)
    rng = np.random.default_rng(seed)
    shape = (config.batch_size, seq_len)
    if vocab_size is None:
        tokens = rng.standard_normal((*shape, token_dim)).astype(np.float32)
    else:
        tokens = rng.integers(0, vocab_size, shape).astype(np.int32)
    batch = {"tokens": tokens, "text_ids": loaded["text_ids"], "text_mask": loaded["text_mask"]}
    return shard_batch(batch, trainer.mesh)


def run(name: str, *, batch: int | None, steps: int, warmup: int, precision: str,
        variant: str, count_xla: str, peak_n: int | None, parts: bool = False,
        profile: bool = False) -> dict:
    info = conditions()
    t0 = time.perf_counter()
    trainer, config = make_trainer(name, batch=batch, precision=precision, variant=variant)
    build_s = time.perf_counter() - t0
    seq_len, token_dim, vocab_size = token_grid(config.model)
    batches = [make_batch(trainer, config, seq_len, token_dim, vocab_size, i) for i in range(2)]

    # Wall time, and CPU time of this process (less sensitive to other jobs' load).
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = trainer.step_fn.lower(trainer.state, trainer.frozen, batches[0])
    lower_s, lower_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    compile_s, compile_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    flops_rolled = float(_cost(compiled)["flops"])

    peak = read_peak()
    dtype = "bfloat16" if precision == "bfloat16" else "float32"
    peak_gflops = peak["peak"][dtype]["gflops"] if peak else None
    n_mm = peak_n or (min(peak["peak"]["float32"]["n"], 2048) if peak else 1024)
    a = jr.normal(jr.key(1), (n_mm, n_mm), jnp.float32)
    matmul = jax.jit(lambda a: jnp.matmul(a, a, precision=jax.lax.Precision.HIGHEST))
    matmul(a).block_until_ready()

    state = trainer.state
    step_times, step_cpu, mm_times, mm_cpu = [], [], [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, trainer.frozen, batches[i % 2])
        jax.block_until_ready(metrics)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        matmul(a).block_until_ready()
        dm, dmc = time.perf_counter() - t0, time.process_time() - c0
        if i >= warmup:
            step_times.append(dt)
            step_cpu.append(dc)
            mm_times.append(dm)
            mm_cpu.append(dmc)
    extra = {}
    if profile:
        def one_step():
            out = compiled(state, trainer.frozen, batches[0])
            return jax.block_until_ready(out)[0]

        extra, state = profile_call(one_step, compiled.as_text(), "/tmp/fluid-mfu-profile")
    trainer.state = state
    step_s = float(np.median(step_times))
    interleaved_gflops = 2 * n_mm**3 / float(np.median(mm_times)) / 1e9
    # Per CPU-second of this process: what other jobs take from us (time waiting for a
    # core) drops out, as long as the step and the matmul keep the same threads busy.
    step_cpu_s = float(np.median(step_cpu))
    mm_gflops_per_cpu_s = 2 * n_mm**3 / float(np.median(mm_cpu)) / 1e9

    analytic = train_flops(config.model, batch=config.batch_size, seq_len=seq_len,
                           token_dim=token_dim, vocab_size=vocab_size)
    flops_unrolled = dot_flops = None
    if count_xla != "none":
        with unrolled_scans():
            lowered_u = trainer.step_fn.lower(trainer.state, trainer.frozen, batches[0])
            flops_unrolled, dot_flops = xla_flops(lowered_u, compile=count_xla == "compiled")
    achieved = analytic["train_total"] / step_s / 1e9
    if parts:
        extra |= time_products(train_products(config.model, batch=config.batch_size,
                                             seq_len=seq_len, token_dim=token_dim),
                              warmup=1, runs=max(steps, 2))
        extra |= time_components(trainer.model(ema=False), batches[0], warmup=1,
                                 runs=max(steps, 2))
        fwd = analytic["forward"]
        extra["backbone_alone_gflops"] = 3 * fwd["backbone"] / extra["backbone_alone_s"] / 1e9
        extra["head_alone_gflops"] = 3 * fwd["head"] / extra["head_alone_s"] / 1e9
    return {
        "config": name,
        "variant": variant,
        "model": dataclasses.asdict(config.model),
        "precision": precision,
        "batch_size": config.batch_size,
        "seq_len": seq_len,
        "token_dim": token_dim,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "build_s": build_s,
        "lower_s": lower_s,
        "lower_cpu_s": lower_cpu_s,
        "compile_s": compile_s,
        "compile_cpu_s": compile_cpu_s,
        "step_s_median": step_s,
        "step_times": step_times,
        "step_cpu_s_median": step_cpu_s,
        "step_cpu_times": step_cpu,
        "images_per_s": config.batch_size / step_s,
        "tokens_per_s": config.batch_size * seq_len / step_s,
        "analytic_train_flops": analytic["train_total"],
        "analytic_train_flops_exact": analytic["train_total_exact"],
        "analytic_forward_flops": analytic["forward_total"],
        "analytic_train_flops_by_part": analytic["train"],
        "analytic_forward_flops_detail": analytic["forward_detail"],
        "xla_flops_rolled": flops_rolled,
        "xla_flops": flops_unrolled,
        "xla_flops_source": count_xla,
        "xla_over_analytic": None if flops_unrolled is None
        else flops_unrolled / analytic["train_total"],
        "xla_dot_flops": dot_flops,
        "xla_dots_over_analytic_exact": None if dot_flops is None
        else dot_flops / analytic["train_total_exact"],
        "xla_non_dot_fraction": None if dot_flops is None
        else 1 - dot_flops / flops_unrolled,
        "achieved_gflops": achieved,
        "peak_gflops": peak_gflops,
        "peak_dtype": dtype,
        "mfu": achieved / peak_gflops if peak_gflops else None,
        "interleaved_matmul_n": n_mm,
        "interleaved_peak_gflops": interleaved_gflops,
        "mfu_interleaved": achieved / interleaved_gflops,
        "achieved_gflops_per_cpu_s": analytic["train_total"] / step_cpu_s / 1e9,
        "interleaved_matmul_gflops_per_cpu_s": mm_gflops_per_cpu_s,
        "mfu_cpu_time": analytic["train_total"] / step_cpu_s / 1e9 / mm_gflops_per_cpu_s,
        **extra,
        "conditions": finish(info),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="*", default=["mar256"])
    parser.add_argument("--variant", default="fluid", choices=["fluid", "continuous-raster"],
                        help="for the mar* configurations")
    parser.add_argument("--batch", type=int, default=None, help="default: 8, or the preset's")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--xla-flops", default="compiled", choices=["compiled", "lowered", "none"],
                        help="XLA's count with unrolled scans: after optimisation (compiles "
                             "the unrolled step once more), before it, or not at all")
    parser.add_argument("--peak-n", type=int, default=None,
                        help="size of the interleaved matmul; default: the peak's, <= 2048")
    parser.add_argument("--parts", action="store_true",
                        help="also time every product shape alone, and the backbone and "
                             "the head alone")
    parser.add_argument("--profile", action="store_true",
                        help="profile one step with jax.profiler: time by kind of operation")
    parser.add_argument("--out", default=str(RESULTS / "mfu.json"))
    args = parser.parse_args()
    runs = [
        run(name, batch=args.batch, steps=args.steps, warmup=args.warmup,
            precision=args.precision, variant=args.variant, count_xla=args.xla_flops,
            peak_n=args.peak_n, parts=args.parts, profile=args.profile)
        for name in args.config
    ]
    out = write_json(args.out, {"runs": runs})
    print(f"{'config':<14}{'batch':>6}{'step s':>9}{'img/s':>8}{'tok/s':>9}{'lower s':>9}"
          f"{'compile s':>10}{'GFLOP/step':>12}{'xla/anal':>9}{'GFLOP/s':>9}{'MFU':>7}"
          f"{'MFU(int)':>9}{'MFU(cpu)':>9}")
    for r in runs:
        ratio = f"{r['xla_over_analytic']:.3f}" if r["xla_over_analytic"] else "-"
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        print(f"{r['config']:<14}{r['batch_size']:>6}{r['step_s_median']:>9.3f}"
              f"{r['images_per_s']:>8.2f}{r['tokens_per_s']:>9.0f}{r['lower_s']:>9.1f}"
              f"{r['compile_s']:>10.1f}{r['analytic_train_flops'] / 1e9:>12.1f}{ratio:>9}"
              f"{r['achieved_gflops']:>9.1f}{mfu:>7}{r['mfu_interleaved']:>9.3f}"
              f"{r['mfu_cpu_time']:>9.3f}")
        c = r["conditions"]
        print(f"  load average {c['loadavg_start'][0]:.2f} -> {c['loadavg_end'][0]:.2f}, "
              f"{c['cpu_count']} CPUs, jax {c['jax_version']}; train FLOPs by part (G): "
              + ", ".join(f"{k} {v / 1e9:.2f}"
                          for k, v in r["analytic_train_flops_by_part"].items()))
        if "matmuls_alone_step_s" in r:
            print(f"  matmuls alone at the step's shapes: {r['matmuls_alone_step_s']:.3f} s "
                  f"({r['matmuls_alone_gflops']:.1f} GFLOP/s); backbone alone "
                  f"{r['backbone_alone_s']:.3f} s ({r['backbone_alone_gflops']:.1f} GFLOP/s), "
                  f"head alone {r['head_alone_s']:.3f} s ({r['head_alone_gflops']:.1f} GFLOP/s)")
        if "profiled_op_s" in r:
            print_profile(r)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
