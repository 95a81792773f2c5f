"""Compile time of the train step and of the sampling loop, and what it is made of.

    python benchmarks/compile.py                          # tiny-fluid (target: < 20 s each)
    python benchmarks/compile.py --preset tiny-continuous-raster

For one preset, tracing (`lower`) and XLA compilation (`compile`) of:

- `train_step`: the `Trainer`'s jitted step (loss, gradient, clipping, AdamW, EMA);
- `train_step_sgd`: the same step with plain SGD in place of the configured optimizer, so
  the optimizer's share shows;
- `grad`: the gradient of the loss alone; `loss`: the loss alone;
- `sampling`: `FluidModel.generate` at the preset's sampling steps and guidance (the whole
  loop, as `fluid.sample.sample_images` jits it), and at `--sample-steps-alt` steps: the
  random order runs one `lax.scan` per run of equal per-step token counts, each with its own
  copy of the backbone and head, so the number of distinct runs (`scan_groups`) drives it.

Each with wall time and the process's CPU time (`*_cpu_s`), which other jobs' load changes
less. Writes `benchmarks/results/compile_<preset>.json`.
"""

import argparse
import itertools
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.random as jr
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, conditions, finish, write_json
from flops import token_grid
from mfu import make_batch, make_trainer
from sampling import captions, generate_fn

from fluid.recipes import prepare, trainable_mask


def timed_compile(jitted, *args) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = jitted.lower(*args)
    lower_s, lower_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    lowered.compile()
    compile_s, compile_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    return {"lower_s": lower_s, "lower_cpu_s": lower_cpu_s, "compile_s": compile_s,
            "compile_cpu_s": compile_cpu_s, "total_s": lower_s + compile_s,
            "total_cpu_s": lower_cpu_s + compile_cpu_s}


def scan_groups(model, steps: int) -> int | None:
    if model.backbone.attention == "causal":
        return None
    return len(list(itertools.groupby(model.order.step_counts(model.seq_len, steps))))


def run(preset: str, *, alt_steps: int) -> dict:
    info = conditions()
    trainer, config = make_trainer(preset, batch=None, precision="float32", variant="fluid")
    seq_len, token_dim, vocab_size = token_grid(config.model)
    batch = make_batch(trainer, config, seq_len, token_dim, vocab_size, 0)
    out = {"preset": preset, "batch_size": config.batch_size}
    out["train_step"] = timed_compile(trainer.step_fn, trainer.state, trainer.frozen, batch)

    sgd = prepare(config, progress=False, optimizer=optax.sgd(1e-3)).trainer
    out["train_step_sgd"] = timed_compile(sgd.step_fn, sgd.state, sgd.frozen, batch)

    model = trainer.model(ema=False)
    params, rest = eqx.partition(model, trainable_mask(model))

    def loss(params, batch, key):
        return eqx.combine(params, rest).loss(batch, key=key)

    out["grad"] = timed_compile(jax.jit(jax.value_and_grad(loss)), params, batch, jr.key(0))
    out["loss"] = timed_compile(jax.jit(loss), params, batch, jr.key(0))

    ids, mask = captions(config.model, 4)
    for name, steps in (("sampling", config.sample_steps), ("sampling_alt", alt_steps)):
        steps = min(steps, seq_len)
        generate, gparams = generate_fn(model, steps=steps, cfg=config.sample_cfg)
        out[name] = {"steps": steps, "cfg": config.sample_cfg,
                     "scan_groups": scan_groups(model, steps),
                     **timed_compile(generate, gparams, ids, mask, jr.key(0))}
    out["conditions"] = finish(info)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-fluid")
    parser.add_argument("--sample-steps-alt", type=int, default=1,
                        help="a second sampling-step count (1: one scan group)")
    parser.add_argument("--out", default=None, help="default: results/compile_<preset>.json")
    args = parser.parse_args()
    r = run(args.preset, alt_steps=args.sample_steps_alt)
    out = write_json(args.out or RESULTS / f"compile_{args.preset}.json", r)
    print(f"{args.preset}: lower and compile, wall s (CPU s)")
    print(f"{'program':<16}{'lower':>14}{'compile':>16}{'total':>16}{'groups':>8}")
    for name in ("train_step", "train_step_sgd", "grad", "loss", "sampling", "sampling_alt"):
        t = r[name]
        groups = t.get("scan_groups")
        print(f"{name:<16}{t['lower_s']:>7.1f} ({t['lower_cpu_s']:>4.1f}){t['compile_s']:>9.1f} "
              f"({t['compile_cpu_s']:>4.1f}){t['total_s']:>9.1f} ({t['total_cpu_s']:>4.1f})"
              f"{'' if groups is None else groups:>8}")
    c = r["conditions"]
    print(f"load average {c['loadavg_start'][0]:.2f} -> {c['loadavg_end'][0]:.2f}, "
          f"{c['cpu_count']} CPUs, jax {c['jax_version']}; wrote {out}")


if __name__ == "__main__":
    main()
