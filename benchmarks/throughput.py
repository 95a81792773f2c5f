"""Train-step and sampling throughput of presets: median over runs after warm-up.

    python benchmarks/throughput.py                         # the four tiny variants
    python benchmarks/throughput.py --presets shapes-fluid demo --steps 10
    python benchmarks/throughput.py --presets demo --precision float32 bfloat16
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python benchmarks/throughput.py --presets tiny-fluid --override mesh.data=8

Writes JSON (machine, jax version, batch, warm-up, per-step times) and prints a table.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.random as jr
import numpy as np

from fluid.presets import VARIANTS, get_config
from fluid.recipes import prepare
from fluid.sample import sample_images
from fluid.train import shard_batch


def bench_preset(
    name: str, steps: int, warmup: int, sample_batch: int, precision: str, overrides: dict
) -> dict:
    config = get_config(name, precision=precision, **overrides)
    t0 = time.perf_counter()
    recipe = prepare(config, progress=False)
    trainer = recipe.trainer
    build_s = time.perf_counter() - t0
    batches = [shard_batch(next(trainer.loader), trainer.mesh) for _ in range(warmup + steps)]
    # XLA's own accounting of one device's memory for the compiled step.
    t0 = time.perf_counter()
    compiled = trainer.step_fn.lower(trainer.state, trainer.frozen, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    memory = {
        k: int(getattr(mem, k, 0) or 0)
        for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                  "alias_size_in_bytes", "generated_code_size_in_bytes")
    }
    # Peak of one device: live arguments and outputs (less what donation aliases) + temps.
    memory["peak_bytes"] = (memory["argument_size_in_bytes"] + memory["output_size_in_bytes"]
                            - memory["alias_size_in_bytes"] + memory["temp_size_in_bytes"])
    state, metrics = trainer.step_fn(trainer.state, trainer.frozen, batches[0])
    jax.block_until_ready(metrics)
    trainer.state = state
    times = []
    for i, batch in enumerate(batches[1:]):
        t0 = time.perf_counter()
        trainer.state, metrics = trainer.step_fn(trainer.state, trainer.frozen, batch)
        jax.block_until_ready(metrics)
        if i >= warmup - 1:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    seq = trainer.model().seq_len
    prompts = ["a red circle"] * sample_batch
    kw = {"text_len": config.model.text_len, "steps": config.sample_steps,
          "cfg": config.sample_cfg}
    t0 = time.perf_counter()
    sample_images(trainer.model(), recipe.text_tokenizer, prompts, key=jr.key(0), **kw)
    sample_compile_s = time.perf_counter() - t0
    sample_times = []
    for r in range(3):
        t0 = time.perf_counter()
        sample_images(trainer.model(), recipe.text_tokenizer, prompts, key=jr.key(r + 1), **kw)
        sample_times.append(time.perf_counter() - t0)
    sample_s = statistics.median(sample_times)
    return {
        "preset": name,
        "precision": precision,
        "overrides": overrides,
        "devices": len(trainer.mesh.devices.flat),
        "batch_size": config.batch_size,
        "tokens_per_image": seq,
        "build_s": build_s,
        "train_compile_s": compile_s,
        "step_memory": memory,
        "train_step_s_median": step_s,
        "train_step_times": times,
        "train_images_per_s": config.batch_size / step_s,
        "train_tokens_per_s": config.batch_size * seq / step_s,
        "sample_batch": sample_batch,
        "sample_steps": config.sample_steps,
        "sample_cfg": config.sample_cfg,
        "sample_first_call_s": sample_compile_s,
        "sample_s_median": sample_s,
        "sample_images_per_s": sample_batch / sample_s,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="*", default=[f"tiny-{v}" for v in VARIANTS])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sample-batch", type=int, default=8)
    parser.add_argument("--precision", nargs="*", default=["float32"])
    parser.add_argument("--override", nargs="*", default=[], help="dotted.key=value")
    parser.add_argument("--out", default="benchmarks/results/throughput.json")
    args = parser.parse_args()
    overrides = dict(kv.split("=", 1) for kv in args.override)
    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "devices": [str(d) for d in jax.devices()],
                    "cpu_count": __import__("os").cpu_count()},
        "jax_version": jax.__version__,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "runs": [
            bench_preset(p, args.steps, args.warmup, args.sample_batch, prec, overrides)
            for p in args.presets
            for prec in args.precision
        ],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"{'preset':<18}{'precision':<10}{'dev':>4}{'step s':>9}{'img/s':>9}{'tok/s':>10}"
          f"{'compile s':>11}{'sample img/s':>14}{'peak MiB':>10}")
    for r in results["runs"]:
        print(f"{r['preset']:<18}{r['precision']:<10}{r['devices']:>4}"
              f"{r['train_step_s_median']:>9.4f}{r['train_images_per_s']:>9.1f}"
              f"{r['train_tokens_per_s']:>10.0f}{r['train_compile_s']:>11.1f}"
              f"{r['sample_images_per_s']:>14.2f}{r['step_memory']['peak_bytes'] / 2**20:>10.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
