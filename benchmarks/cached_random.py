"""Random order with a KV cache (the `arpg` backbone) against the bidirectional random order:
sampling images per second at equal steps, size and batch, and the backbone's time per step
against the step index.

    python benchmarks/cached_random.py                          # mar256, batch 4, 16 and 64 steps
    python benchmarks/cached_random.py --config mar256 --steps 16 --runs 3
    python benchmarks/cached_random.py --no-sampling            # the per-step times only

Both models are `benchmarks/_common.py`'s reference configuration (`mar256`: width 256, 4
blocks, 256 tokens of 16 channels, a 3 x 256 diffusion head of 100 steps), one with the
bidirectional transformer (`fluid`), one with the `arpg` backbone of the same depth (2
content and 2 query blocks, the same weights but for the query embedding:
`continuous-arpg`). Sampling is `benchmarks/sampling.py`'s run of each (the jitted
`FluidModel.generate`, guidance 3 on the linear schedule, medians over `--runs`).

Per step: the backbone's calls of one sampling step (`decode` at the step's `k` positions
and `observe` of the tokens written there), jitted and timed for `--batch` examples under
guidance's two contexts, at a state where `p` tokens are known, for `p` at 0, a quarter, a
half, three quarters and the end of the sequence. A cached backbone's step costs the same
at every `p` (its query reads a memory that grows, a small part of the work); the
bidirectional one reruns every position at each step, also at every `p`, at a higher cost.
"""

import argparse
import json
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from fluid.build import abstract_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, conditions, finish, median_time, model_config, write_json
from sampling import build
from sampling import run as run_sampling

VARIANTS = ("fluid", "continuous-arpg")


def step_times(name: str, variant: str, *, batch: int, k: int, warmup: int, runs: int) -> dict:
    """Seconds of one sampling step's backbone calls at several counts of known tokens."""
    model = build(model_config(name, variant))
    backbone = model.backbone
    n, dim = backbone.seq_len, backbone.dim
    ctx_len = model.null_ids.shape[0]
    x = jr.normal(jr.key(0), (batch, n, dim))
    ctx = jr.normal(jr.key(1), (batch, 2, ctx_len, dim))
    ctx_mask = jnp.broadcast_to(jnp.arange(ctx_len) < 6, (batch, 2, ctx_len))

    def identity(v):
        return v

    @eqx.filter_jit
    def prepare(backbone, x, ctx, ctx_mask, p):
        def one(x, ctx, ctx_mask):
            state = backbone.init_decode(ctx, ctx_mask)
            if p:
                known = jnp.arange(p)
                _, state = backbone.decode(state, x, identity, known, ctx, ctx_mask)
                state = backbone.observe(state, x, identity, known, ctx, ctx_mask)
            return state

        return jax.vmap(one)(x, ctx, ctx_mask)

    @eqx.filter_jit
    def step(backbone, state, x, ctx, ctx_mask, positions):
        def one(state, x, ctx, ctx_mask):
            z, state = backbone.decode(state, x, identity, positions, ctx, ctx_mask)
            return z, backbone.observe(state, x, identity, positions, ctx, ctx_mask)

        return jax.vmap(one)(state, x, ctx, ctx_mask)

    out = []
    for p in sorted({0, n // 4, n // 2, 3 * n // 4, n - k}):
        state = prepare(backbone, x, ctx, ctx_mask, p)
        positions = jnp.arange(p, p + k)
        def call(state=state, positions=positions):
            return jax.block_until_ready(step(backbone, state, x, ctx, ctx_mask, positions))

        seconds, times = median_time(call, warmup=warmup, runs=runs)
        out.append({"known": p, "positions": k, "step_s_median": seconds, "times": times})
    return {"variant": variant, "backbone": type(backbone).__name__, "batch_size": batch,
            "steps_at": out, "last_over_first": out[-1]["step_s_median"] / out[0]["step_s_median"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="mar256")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-sampling", action="store_true", help="per-step times only")
    parser.add_argument("--out", default=str(RESULTS / "cached_random.json"))
    args = parser.parse_args()
    info = conditions()
    result: dict = {"config": args.config, "batch_size": args.batch, "cfg": args.cfg,
                    "warmup": args.warmup, "runs": args.runs, "sampling": [], "per_step": []}
    if not args.no_sampling:
        for steps in args.steps:
            row = {"steps": steps}
            for variant in VARIANTS:
                r = run_sampling(args.config, variant, batch=args.batch, steps=steps,
                                 cfg=args.cfg, warmup=args.warmup, runs=args.runs, count=False,
                                 parts=False)
                row[variant] = {key: r.get(key) for key in (
                    "sample_s_median", "sample_times", "images_per_s", "compile_s",
                    "sample_flops_per_image", "achieved_gflops", "fraction_of_peak",
                    "fraction_of_interleaved_peak")}
                print(f"{steps:>3} steps  {variant:<16} {r['images_per_s']:.3f} images/s "
                      f"({r['sample_s_median']:.2f} s per {args.batch})", flush=True)
            row["arpg_over_bidirectional"] = (row["continuous-arpg"]["images_per_s"]
                                              / row["fluid"]["images_per_s"])
            result["sampling"].append(row)
    seq = abstract_model(model_config(args.config, "fluid")).seq_len  # no weights made
    k = max(1, seq // min(args.steps))  # a typical step: n / steps positions
    for variant in VARIANTS:
        r = step_times(args.config, variant, batch=args.batch, k=k, warmup=args.warmup,
                       runs=args.runs)
        result["per_step"].append(r)
        cells = "  ".join(f"p={s['known']}: {1e3 * s['step_s_median']:.1f} ms"
                          for s in r["steps_at"])
        print(f"{variant:<16} {k} positions per step  {cells}  last/first "
              f"{r['last_over_first']:.2f}", flush=True)
    result["conditions"] = finish(info)
    path = write_json(args.out, result)
    print(json.dumps({"wrote": str(path)}))


if __name__ == "__main__":
    main()
