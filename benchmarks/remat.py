"""Rematerialisation policies of the scanned layers, how linear layers are called and how
attention lays out its heads: the train step under each, timed in turn.

`fluid.nn.scan_layers` runs the backbone's blocks and the diffusion head's residual blocks
under `jax.checkpoint` with `fluid.nn._scan.REMAT_POLICY`. This script compiles the
`Trainer`'s step once per policy (the module global is swapped while tracing) and then
alternates the compiled steps, so that the machine's drifting load hits every policy alike.

    python benchmarks/remat.py --config mar256 --steps 10
    python benchmarks/remat.py --config mar512 --steps 4 --policies default none

Policies: `default` (the library's), `none` (a plain scan: every intermediate saved),
the name of any `jax.checkpoint_policies` member, or `eqx-linear`: the default policy with
`fluid.nn.dense` calling `eqx.nn.Linear` itself (`W @ x` under `vmap`) instead of `x @ W.T`
(traced inside `fluid.nn.vector_products()`), or `strided-attention`: the default policy
with `fluid.nn.dot_product_attention` contracting `qhd,khd->hqk` as it stands, without first
moving the heads in front (`fluid.nn._attention.HEADS_FIRST_MIN_QUERIES` raised while
tracing).

    python benchmarks/remat.py --config mar256 mar512 --steps 5 --policies default eqx-linear
 `results/remat.json`, per run:
`policies[]` with `compile_s`, `step_times`, `step_cpu_times`, `step_s_median`,
`step_cpu_s_median` and `ratio_to_first` (median time over the first policy's).
"""

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, conditions, finish, write_json  # noqa: E402
from flops import token_grid  # noqa: E402
from mfu import make_batch, make_trainer  # noqa: E402

from fluid.nn import _attention, _scan, vector_products  # noqa: E402

VARIANTS = ("eqx-linear", "strided-attention")  # the default policy, something else changed


def policy(name: str):
    if name == "default" or name in VARIANTS:
        return _scan.REMAT_POLICY
    if name == "none":
        return None
    return getattr(jax.checkpoint_policies, name)


def run(name: str, policies: list[str], steps: int, warmup: int) -> dict:
    info = conditions()
    trainer, config = make_trainer(name, batch=None, precision="float32", variant="fluid")
    seq_len, token_dim, vocab_size = token_grid(config.model)
    batch = make_batch(trainer, config, seq_len, token_dim, vocab_size, 0)
    default, heads_first = _scan.REMAT_POLICY, _attention.HEADS_FIRST_MIN_QUERIES
    compiled, rows = [], []
    for p in policies:
        _scan.REMAT_POLICY = policy(p)
        if p == "strided-attention":
            _attention.HEADS_FIRST_MIN_QUERIES = sys.maxsize
        try:
            jax.clear_caches()  # the jitted step is cached on its arguments, not the global
            t0 = time.perf_counter()
            products = vector_products() if p == "eqx-linear" else contextlib.nullcontext()
            with products:
                lowered = trainer.step_fn.lower(trainer.state, trainer.frozen, batch)
            compiled.append(lowered.compile())
            rows.append({"policy": p, "compile_s": time.perf_counter() - t0,
                         "step_times": [], "step_cpu_times": []})
        finally:
            _scan.REMAT_POLICY = default
            _attention.HEADS_FIRST_MIN_QUERIES = heads_first
    state = trainer.state
    for i in range(warmup + steps):
        for step, row in zip(compiled, rows):
            t0, c0 = time.perf_counter(), time.process_time()
            state, metrics = step(state, trainer.frozen, batch)
            jax.block_until_ready(metrics)
            if i >= warmup:
                row["step_times"].append(time.perf_counter() - t0)
                row["step_cpu_times"].append(time.process_time() - c0)
    for row in rows:
        row["step_s_median"] = statistics.median(row["step_times"])
        row["step_cpu_s_median"] = statistics.median(row["step_cpu_times"])
        row["ratio_to_first"] = row["step_s_median"] / rows[0]["step_s_median"]
        row["cpu_ratio_to_first"] = row["step_cpu_s_median"] / rows[0]["step_cpu_s_median"]
    return {"config": name, "batch_size": config.batch_size, "steps": steps, "warmup": warmup,
            "policies": rows, "conditions": finish(info)}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="*", default=["mar256"])
    parser.add_argument("--policies", nargs="*",
                        default=["none", "default", "dots_saveable", "nothing_saveable"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "remat.json"))
    args = parser.parse_args()
    runs = [run(name, args.policies, args.steps, args.warmup) for name in args.config]
    out = write_json(args.out, {"runs": runs})
    print(f"{'config':<10}{'policy':<36}{'compile s':>10}{'step s':>9}{'ratio':>7}"
          f"{'cpu s':>8}{'ratio':>7}")
    for r in runs:
        for p in r["policies"]:
            print(f"{r['config']:<10}{p['policy']:<36}{p['compile_s']:>10.1f}"
                  f"{p['step_s_median']:>9.3f}{p['ratio_to_first']:>7.3f}"
                  f"{p['step_cpu_s_median']:>8.3f}{p['cpu_ratio_to_first']:>7.3f}")
        c = r["conditions"]
        print(f"  load average {c['loadavg_start'][0]:.2f} -> {c['loadavg_end'][0]:.2f}, "
              f"{c['cpu_count']} CPUs, jax {c['jax_version']}, batch {r['batch_size']}, "
              f"{r['steps']} alternating steps after {r['warmup']} warm-up")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
