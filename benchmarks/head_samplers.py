"""The heads' samplers at equal quality: head evaluations per token against sample quality, on
a toy conditional distribution each head is trained on here.

    python benchmarks/head_samplers.py                      # a few minutes on a 2-core CPU
    python benchmarks/head_samplers.py --train-steps 500 --samples 128   # a quick look

The distribution: `--classes` conditions (one-hot condition vectors); for each, a mixture of
`--modes` Gaussians of standard deviation 0.05 in `--token-dim` channels, means uniform in
[-0.8, 0.8]. One diffusion head (MAR's, with `clip_denoised=1.0`) and one flow head per
`prediction` are trained on it with the same network size, optimiser and steps. Each sampler
then draws `--samples` tokens per condition (no guidance, temperature 1), and the quality is
the sliced Wasserstein-1 distance to as many fresh true samples (128 random directions,
averaged over conditions); `floor` is the same distance between two independent true sample
sets, the best a sampler can show at this sample size. `evals_per_token` is
`head.num_evaluations(steps)`; guidance would double it.
"""

import argparse
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, conditions, finish, replace_fields, write_json

from fluid.heads import DiffusionHead, FlowHead


def make_distribution(key, classes: int, modes: int, token_dim: int):
    means = jr.uniform(key, (classes, modes, token_dim), minval=-0.8, maxval=0.8)

    def draw(key, cls):
        k_mode, k_noise = jr.split(key)
        mode = jr.randint(k_mode, cls.shape, 0, modes)
        return means[cls, mode] + 0.05 * jr.normal(k_noise, (*cls.shape, token_dim))

    return draw


def train(head, draw, classes: int, *, steps: int, batch: int, lr: float, key):
    opt = optax.adam(lr)
    params, static = eqx.partition(head, eqx.is_inexact_array)

    @jax.jit
    def run(params, key):
        def step(carry, k):
            params, state = carry
            k_cls, k_x, k_loss = jr.split(k, 3)
            cls = jr.randint(k_cls, (batch,), 0, classes)
            z, x = jax.nn.one_hot(cls, classes), draw(k_x, cls)

            def loss(p):
                h = eqx.combine(p, static)
                keys = jr.split(k_loss, batch)
                return jnp.mean(jax.vmap(lambda a, b, kk: h.loss(a, b, key=kk))(z, x, keys))

            value, grads = jax.value_and_grad(loss)(params)
            updates, state = opt.update(grads, state)
            return (eqx.apply_updates(params, updates), state), value

        (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), jr.split(key, steps))
        return params, losses

    params, losses = run(params, key)
    return eqx.combine(params, static), np.asarray(losses)


def sliced_w1(a: np.ndarray, b: np.ndarray, directions: np.ndarray) -> float:
    pa, pb = np.sort(a @ directions.T, axis=0), np.sort(b @ directions.T, axis=0)
    return float(np.mean(np.abs(pa - pb)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--modes", type=int, default=4)
    parser.add_argument("--token-dim", type=int, default=16)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--out", default=str(RESULTS / "head_samplers.json"))
    args = parser.parse_args()
    info = conditions()
    info["settings"] = vars(args)

    C, D = args.classes, args.token_dim
    draw = make_distribution(jr.key(0), C, args.modes, D)
    directions = np.asarray(jr.normal(jr.key(1), (128, D)), np.float64)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    cls = jnp.repeat(jnp.arange(C), args.samples)
    truth = np.asarray(draw(jr.key(2), cls)).reshape(C, args.samples, D)
    other = np.asarray(draw(jr.key(3), cls)).reshape(C, args.samples, D)
    floor = np.mean([sliced_w1(truth[c], other[c], directions) for c in range(C)])
    print(f"floor (two true sample sets): {floor:.4f}")
    info["floor"] = floor

    size = {"width": args.width, "depth": args.depth}
    # Clipped as the presets' pixel tokens are: with MAR's unclipped x_0 a briefly trained
    # head's chain leaves the data range near t = 999 (`DiffusionHead`'s `clip_denoised`).
    heads = {"diffusion": DiffusionHead(C, D, **size, clip_denoised=1.0, key=jr.key(4))}
    for prediction in ("velocity", "clean", "noise"):
        heads[f"flow-{prediction}"] = FlowHead(C, D, **size, prediction=prediction,
                                               key=jr.key(4))
    samplers = {
        "diffusion": [("ddpm", None, s) for s in (100, 50, 25, 10)]
        + [("ddim", 0.0, s) for s in (50, 25, 10, 5)] + [("ddim", 1.0, s) for s in (50, 25)],
        "flow": [(solver, None, s) for solver in ("euler", "heun") for s in (32, 16, 8, 4, 2)]
        + [("euler", None, 1)],
    }
    rows = []
    for name, head in heads.items():
        t0 = time.perf_counter()
        head, losses = train(head, draw, C, steps=args.train_steps, batch=args.batch,
                             lr=args.lr, key=jr.key(5))
        train_s = time.perf_counter() - t0
        print(f"{name}: trained in {train_s:.1f} s, loss {losses[:50].mean():.4f} -> "
              f"{losses[-50:].mean():.4f}")
        for sampler, eta, steps in samplers["diffusion" if name == "diffusion" else "flow"]:
            if name == "diffusion":
                h = replace_fields(head, DiffusionHead, sampler=sampler, eta=eta or 0.0)
            else:
                h = replace_fields(head, FlowHead, solver=sampler)
            fn = eqx.filter_jit(lambda h, z, keys, steps=steps: jax.vmap(
                lambda zz, k: h.sample(zz, None, 1.0, 1.0, key=k, steps=steps))(z, keys))
            z = jax.nn.one_hot(cls, C)
            keys = jr.split(jr.key(6), len(cls))
            samples = np.asarray(fn(h, z, keys)).reshape(C, args.samples, D)
            t0 = time.perf_counter()
            jax.block_until_ready(fn(h, z, keys))
            sample_s = time.perf_counter() - t0
            finite = bool(np.isfinite(samples).all())
            sw = (np.mean([sliced_w1(samples[c], truth[c], directions) for c in range(C)])
                  if finite else float("inf"))
            row = {"head": name, "steps": steps, "evals_per_token": h.num_evaluations(steps),
                   "sampler": sampler if eta is None else f"{sampler}(eta={eta:g})",
                   "sliced_w1": float(sw), "sample_s": sample_s,
                   "final_loss": float(losses[-50:].mean())}
            rows.append(row)
            print(f"  {row['sampler']:>14} steps {steps:>3}  evals {row['evals_per_token']:>3}  "
                  f"SW1 {sw:.4f}  ({sample_s:.2f} s for {len(cls)} tokens)")
    info["rows"] = rows
    write_json(Path(args.out), finish(info))


if __name__ == "__main__":
    main()
