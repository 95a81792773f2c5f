"""The machine's measured matmul peak: large square jitted matmuls, GFLOP/s = 2 n^3 / t.

    python benchmarks/peak.py                              # float32 and bfloat16, 1024..4096
    python benchmarks/peak.py --sizes 1024 2048 --runs 3   # quicker

For each dtype and size: the median over `--runs` calls after `--warmup`; the best size's
figure is that dtype's peak, which `benchmarks/mfu.py` divides by. Writes
`benchmarks/results/peak_<backend>.json` and prints a table.
"""

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, conditions, finish, median_time, write_json


def matmul_gflops(n: int, dtype: str, *, warmup: int, runs: int) -> dict:
    k_a, k_b = jr.split(jr.key(n))
    a = jr.normal(k_a, (n, n), dtype)
    b = jr.normal(k_b, (n, n), dtype)
    # HIGHEST: a float32 matmul computed in float32, whatever a backend's default.
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST))
    t_median, times = median_time(
        lambda: matmul(a, b).block_until_ready(), warmup=warmup, runs=runs
    )
    c0 = time.process_time()
    for _ in range(runs):
        matmul(a, b).block_until_ready()
    cpu_s = (time.process_time() - c0) / runs
    return {
        "n": n,
        "dtype": dtype,
        "s_median": t_median,
        "times": times,
        "gflops": 2 * n**3 / t_median / 1e9,
        "gflops_best_run": 2 * n**3 / min(times) / 1e9,
        # Per CPU-second of this process (times the cores it keeps busy, an estimate of the
        # idle machine's figure that other jobs' load does not lower).
        "cpu_s_mean": cpu_s,
        "gflops_per_cpu_s": 2 * n**3 / cpu_s / 1e9,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1024, 2048, 3072, 4096])
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=None, help="default: results/peak_<backend>.json")
    args = parser.parse_args()
    info = conditions()
    rows = [
        matmul_gflops(n, dtype, warmup=args.warmup, runs=args.runs)
        for dtype in args.dtypes
        for n in args.sizes
    ]
    peak = {}
    for dtype in args.dtypes:
        best = max((r for r in rows if r["dtype"] == dtype), key=lambda r: r["gflops"])
        peak[dtype] = {"gflops": best["gflops"], "n": best["n"]}
    result = {
        "conditions": finish(info),
        "warmup": args.warmup,
        "runs": args.runs,
        "peak": peak,
        "matmuls": rows,
    }
    out = write_json(args.out or RESULTS / f"peak_{jax.default_backend()}.json", result)
    print(f"{'dtype':<10}{'n':>6}{'median s':>11}{'GFLOP/s':>10}{'best-run GFLOP/s':>18}"
          f"{'GFLOP/cpu-s':>13}")
    for r in rows:
        print(f"{r['dtype']:<10}{r['n']:>6}{r['s_median']:>11.4f}{r['gflops']:>10.1f}"
              f"{r['gflops_best_run']:>18.1f}{r['gflops_per_cpu_s']:>13.1f}")
    for dtype, p in peak.items():
        print(f"peak {dtype}: {p['gflops']:.1f} GFLOP/s (n={p['n']})")
    print(f"load average {info['loadavg_start']} -> {info['loadavg_end']}; wrote {out}")


if __name__ == "__main__":
    main()
