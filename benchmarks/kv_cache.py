"""Raster decoding with the causal backbone's KV cache against recomputing the prefix.

    python benchmarks/kv_cache.py                          # mar256's causal backbone, batch 8
    python benchmarks/kv_cache.py --config mar512 --runs 3

Time per token at positions 1, 64, 128, 192 and 256 of a 256-token causal backbone, batch
`--batch` (8: 4 images with guidance's two halves), three ways:

- `cached`: `CausalTransformer.decode_step` through an explicit `KVCache`, `--window`
  consecutive positions ending at the given one run in one `lax.scan` (as the sampling loop
  runs them: cache updated in place), time divided by the window;
- `recompute_prefix`: the backbone's blocks over the prefix of that length, as a sampler
  without a cache and with growing shapes would (one compilation per length);
- `recompute_full`: the backbone's `__call__` over all 256 positions, as a sampler without a
  cache and with static shapes would (the same cost at every position).

Targets (issue 6): cached last / first <= 1.5; recompute / cached at position 256 >= 5.
The prefix computation is checked against the full forward pass before timing.
"""

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, conditions, finish, median_time, model_config, write_json
from sampling import build

from fluid.backbones import CausalTransformer
from fluid.nn import attention_mask


def prefix_forward(backbone: CausalTransformer, x, context, context_mask):
    """`backbone(x, all known, ...)` on the first `len(x)` positions only (its blocks over a
    shorter sequence): the condition of every position of the prefix."""
    p = x.shape[0]
    h = jnp.concatenate([backbone.start_embed[None], x[:-1]]) + backbone.pos_embed[:p]
    h = backbone.blocks(h, attention_mask(p, causal=True), context, context_mask)
    return jax.vmap(backbone.norm)(h) + backbone.out_pos_embed[:p]


def run(name: str, *, batch: int, positions: list[int], window: int, warmup: int,
        runs: int) -> dict:
    info = conditions()
    config = model_config(name, "continuous-raster")
    model = build(config)
    backbone = typing.cast(CausalTransformer, model.backbone)
    n, dim = backbone.seq_len, backbone.dim
    ctx_len = config.text_len
    x = jr.normal(jr.key(0), (batch, n, dim))
    ctx = jr.normal(jr.key(1), (batch, ctx_len, dim))
    ctx_mask = jnp.broadcast_to(jnp.arange(ctx_len) < 6, (batch, ctx_len))

    full = jax.jit(jax.vmap(lambda x, c, m: backbone(x, jnp.ones((n,), bool), c, m)))
    z_full = full(x, ctx, ctx_mask)
    check = jax.jit(jax.vmap(prefix_forward, in_axes=(None, 0, 0, 0)))
    p_check = min(64, n)
    np.testing.assert_allclose(check(backbone, x[:, :p_check], ctx, ctx_mask),
                               z_full[:, :p_check], rtol=1e-4, atol=1e-4)

    caches = jax.jit(jax.vmap(backbone.init_cache))(ctx, ctx_mask)

    @jax.jit
    def decode_window(backbone, x, start, caches, ctx, ctx_mask):
        def one(x, cache, c, m):
            def body(cache, t):
                z, cache = backbone.decode_step(x[t - 1], t, cache, c, m)
                return cache, z

            return jax.lax.scan(body, cache, start + jnp.arange(window))

        return jax.vmap(one)(x, caches, ctx, ctx_mask)

    prefix = jax.jit(jax.vmap(lambda b, x, c, m: prefix_forward(b, x, c, m)[-1],
                              in_axes=(None, 0, 0, 0)))
    rows = []
    full_s, _ = median_time(lambda: full(x, ctx, ctx_mask).block_until_ready(),
                            warmup=warmup, runs=runs)
    for p in positions:
        start = jnp.asarray(max(p - window, 0), jnp.int32)
        cached_s, _ = median_time(
            lambda start=start: jax.block_until_ready(
                decode_window(backbone, x, start, caches, ctx, ctx_mask)
            ),
            warmup=warmup, runs=runs,
        )
        prefix_s, _ = median_time(
            lambda p=p: prefix(backbone, x[:, :p], ctx, ctx_mask).block_until_ready(),
            warmup=warmup, runs=runs,
        )
        rows.append({
            "position": p,
            "cached_s_per_token": cached_s / window,
            "recompute_prefix_s_per_token": prefix_s,
            "recompute_full_s_per_token": full_s,
        })
    first, last = rows[0], rows[-1]
    return {
        "config": name,
        "model": dataclasses.asdict(config),
        "seq_len": n,
        "width": dim,
        "depth": backbone.blocks.depth,
        "batch": batch,
        "window": window,
        "warmup": warmup,
        "runs": runs,
        "rows": rows,
        "cached_last_over_first": last["cached_s_per_token"] / first["cached_s_per_token"],
        "speedup_vs_recompute_prefix_at_last": last["recompute_prefix_s_per_token"]
        / last["cached_s_per_token"],
        "speedup_vs_recompute_full": last["recompute_full_s_per_token"]
        / last["cached_s_per_token"],
        "conditions": finish(info),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="mar256")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--positions", type=int, nargs="*", default=[1, 64, 128, 192, 256])
    parser.add_argument("--window", type=int, default=8,
                        help="positions decoded per timed call (ending at each position)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "kv_cache.json"))
    args = parser.parse_args()
    r = run(args.config, batch=args.batch, positions=args.positions, window=args.window,
            warmup=args.warmup, runs=args.runs)
    out = write_json(args.out, r)
    print(f"{r['config']}: width {r['width']}, {r['depth']} blocks, {r['seq_len']} tokens, "
          f"batch {r['batch']}")
    print(f"{'position':>9}{'cached ms/tok':>15}{'prefix ms/tok':>15}{'full ms/tok':>13}")
    for row in r["rows"]:
        print(f"{row['position']:>9}{row['cached_s_per_token'] * 1e3:>15.3f}"
              f"{row['recompute_prefix_s_per_token'] * 1e3:>15.3f}"
              f"{row['recompute_full_s_per_token'] * 1e3:>13.3f}")
    print(f"cached last/first {r['cached_last_over_first']:.2f} (target <= 1.5); speed-up at "
          f"{r['rows'][-1]['position']}: {r['speedup_vs_recompute_prefix_at_last']:.1f}x vs "
          f"the prefix, {r['speedup_vs_recompute_full']:.1f}x vs the full pass (target >= 5)")
    c = r["conditions"]
    print(f"load average {c['loadavg_start'][0]:.2f} -> {c['loadavg_end'][0]:.2f}, "
          f"{c['cpu_count']} CPUs, jax {c['jax_version']}; wrote {out}")


if __name__ == "__main__":
    main()
