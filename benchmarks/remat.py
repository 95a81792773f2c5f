"""Rematerialisation policies of the scanned layers, how linear layers are called and how
attention lays out its heads: the train step under each, timed in turn.

`fluid.nn.scan_layers` runs the backbone's blocks and the diffusion head's residual blocks
under `jax.checkpoint` with the policy of their `remat` field (`TransformerStack.remat`,
`DiffusionHead.remat`, `fluid.nn.DEFAULT_REMAT_POLICY` by default). This script compiles
the `Trainer`'s step once per policy (the model given that `remat` everywhere) and then
alternates the compiled steps, so that the machine's drifting load hits every policy alike.

    python benchmarks/remat.py --config mar256 --steps 10
    python benchmarks/remat.py --config mar512 --steps 4 --policies default none

Policies: `default` (the library's), `none` (a plain scan: every intermediate saved),
the name of any `jax.checkpoint_policies` member, or `eqx-linear`: the default policy with
`fluid.nn.dense` calling `eqx.nn.Linear` itself (`W @ x` under `vmap`) instead of `x @ W.T`
(every linear layer wrapped by `fluid.nn.per_vector`), or
`strided-attention`: the default policy with `fluid.nn.dot_product_attention` contracting
`qhd,khd->hqk` as it stands, without first moving the heads in front (every attention
layer's `heads_first_min_queries` raised).

    python benchmarks/remat.py --config mar256 mar512 --steps 5 --policies default eqx-linear
 `results/remat.json`, per run:
`policies[]` with `compile_s`, `step_times`, `step_cpu_times`, `step_s_median`,
`step_cpu_s_median` and `ratio_to_first` (median time over the first policy's).
"""

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import jax
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, conditions, finish, replace_fields, write_json  # noqa: E402
from flops import token_grid  # noqa: E402
from mfu import make_batch, make_trainer  # noqa: E402

from fluid.heads import DiffusionHead  # noqa: E402
from fluid.nn import (
    DEFAULT_REMAT_POLICY,
    CrossAttention,
    SelfAttention,
    TransformerStack,
    per_vector,
)

VARIANTS = ("eqx-linear", "strided-attention")  # the default policy, something else changed
# The modules that scan stacked layers (their `remat`), and the attention layers.
SCANNED = (TransformerStack, DiffusionHead)
ATTENTION = (SelfAttention, CrossAttention)


def policy(name: str):
    if name == "default" or name in VARIANTS:
        return DEFAULT_REMAT_POLICY
    if name == "none":
        return None
    return getattr(jax.checkpoint_policies, name)


def transform(name: str):
    """What `--policies name` does to every tree of the model (parameters, state, the
    static part, the state's shardings): leaves and their order stay as they are."""

    def apply(tree):
        tree = replace_fields(tree, SCANNED, remat=policy(name))
        if name == "strided-attention":
            tree = replace_fields(tree, ATTENTION, heads_first_min_queries=sys.maxsize)
        if name == "eqx-linear":
            tree = per_vector(tree)
        return tree

    return apply


def variant_step(trainer, apply):
    """The trainer's own jitted step (its `functools.partial` of the step function, with
    the optimizer, EMA and accumulation it was built with) on the model `apply` makes."""
    step = trainer.step_fn.__wrapped__
    if not (isinstance(step, functools.partial) and "static" in step.keywords):
        raise TypeError("Trainer.step_fn is no longer jit(partial(step, static=...)); "
                        "update benchmarks/remat.py.")
    keywords = {**step.keywords, "static": apply(step.keywords["static"])}
    return jax.jit(
        functools.partial(step.func, *step.args, **keywords),
        out_shardings=(apply(trainer.state_sharding),
                       NamedSharding(trainer.mesh, PartitionSpec())),
        donate_argnums=(0,),
    )


def run(name: str, policies: list[str], steps: int, warmup: int) -> dict:
    info = conditions()
    trainer, config = make_trainer(name, batch=None, precision="float32", variant="fluid")
    seq_len, token_dim, vocab_size = token_grid(config.model)
    batch = make_batch(trainer, config, seq_len, token_dim, vocab_size, 0)
    structure = jax.tree.structure(trainer.state)
    compiled, applies, frozen, rows = [], [], [], []
    for p in policies:
        apply = transform(p)
        t0 = time.perf_counter()
        lowered = variant_step(trainer, apply).lower(apply(trainer.state),
                                                     apply(trainer.frozen), batch)
        compiled.append(lowered.compile())
        applies.append(apply)
        frozen.append(apply(trainer.frozen))
        rows.append({"policy": p, "compile_s": time.perf_counter() - t0,
                     "step_times": [], "step_cpu_times": []})
    state = trainer.state
    for i in range(warmup + steps):
        for step, apply, fixed, row in zip(compiled, applies, frozen, rows):
            args = (apply(state), fixed, batch)
            t0, c0 = time.perf_counter(), time.process_time()
            out, metrics = step(*args)
            jax.block_until_ready(metrics)
            if i >= warmup:
                row["step_times"].append(time.perf_counter() - t0)
                row["step_cpu_times"].append(time.process_time() - c0)
            # Back to the trainer's structure (the same leaves) for the next policy.
            state = jax.tree.unflatten(structure, jax.tree.leaves(out))
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
