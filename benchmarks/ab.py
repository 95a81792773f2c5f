"""The same process, two versions of fluid: equal results, and the speed ratio.

    python benchmarks/ab.py --before e7a43a0                       # the four tiny variants
    python benchmarks/ab.py --before main --presets demo shapes-fluid --runs 7
    python benchmarks/ab.py --before fcef255 --trainer-steps 5     # the whole Trainer too

The package at `--before` (a git revision of this checkout) is extracted next to the working
tree's and imported under another name, `fluid_before` (fluid imports itself only
relatively), so both versions run in one process, on the same inputs, with calls alternated
A, B, A, B: the machine's load moves both alike. For each preset it checks that the loss, the
gradient and the sampled tokens are bit for bit the same (parameters only one version has
are listed), then times the model's train step
(loss, gradient and an Adam update under one `jit`) and sampling (`generate_tokens`, the
preset's steps and guidance), and prints medians and after/before ratios. A ratio under 1 is
faster after.

Writes `results/ab.json` (machine, load, per-call times).
"""

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from _common import RESULTS, conditions, finish, write_json

ROOT = Path(__file__).resolve().parent.parent


def import_revision(revision: str, into: Path):
    """fluid as it is at `revision`, imported as `fluid_before`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", f"{revision}:fluid"],
                             check=True, capture_output=True).stdout
    target = into / "fluid_before"
    target.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    sys.path.insert(0, str(into))
    return importlib.import_module("fluid_before")


def setup(package, name: str, batch: int):
    """A preset's model, a batch of its data and its sampling settings, built by `package`."""
    presets = importlib.import_module(f"{package.__name__}.presets")
    build = importlib.import_module(f"{package.__name__}.build")
    shapes = importlib.import_module(f"{package.__name__}.data.shapes")
    config = presets.get_config(name)
    size = config.data.image_size
    source = shapes.ShapesDataset(size, size=64 + batch)
    text_tokenizer = _data_module(package).make_text_tokenizer(source, config.model.text_vocab_size)
    fit = np.stack([source[64 + i]["image"] for i in range(batch)]).astype(np.float32)
    model = build.build_model(config.model, text_tokenizer=text_tokenizer, key=jr.key(0),
                              fit_images=fit)
    items = [source[i] for i in range(batch)]
    ids, mask = text_tokenizer.encode([it["caption"] for it in items], config.model.text_len)
    data = {"image": jnp.asarray(np.stack([it["image"] for it in items]), jnp.float32),
            "text_ids": jnp.asarray(ids), "text_mask": jnp.asarray(mask)}
    return model, data, config


def _data_module(package):
    # The data wiring moved from `fluid.train` to `fluid.recipes` (issue 21).
    try:
        return importlib.import_module(f"{package.__name__}.recipes")
    except ModuleNotFoundError:
        return importlib.import_module(f"{package.__name__}.train")


def whole_trainer(package, name: str, batch: int):
    """The `Trainer` a run of preset `name` trains with, as `package` wires it: through its
    recipe where it has recipes (`recipes.prepare(config).trainer`), else `Trainer(config)`."""
    presets = importlib.import_module(f"{package.__name__}.presets")
    config = presets.get_config(name, batch_size=batch, log_every=10**6)
    try:
        recipes = importlib.import_module(f"{package.__name__}.recipes")
    except ModuleNotFoundError:
        train = importlib.import_module(f"{package.__name__}.train")
        return train.Trainer(config, progress=False)
    return recipes.prepare(config, progress=False).trainer


def train_step(model, data):
    optimizer = optax.adamw(1e-4)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, key):
        def loss(p):
            return eqx.combine(p, static).loss(data, key=key)

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value, grads

    return lambda: step(params, state, jr.key(1))


def sampler(model, data, config, images: int):
    ids, mask = data["text_ids"][:images], data["text_mask"][:images]
    generate = eqx.filter_jit(
        lambda m, i, k, key: m.generate_tokens(
            i, k, key=key, steps=config.sample_steps, cfg=config.sample_cfg,
            cfg_schedule="linear", temperature=config.sample_temperature,
        )
    )
    return lambda: generate(model, ids, mask, jr.key(2))


def named(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def differences(a, b) -> list[str]:
    """Where two results differ. Parameters only one version has (a field added or
    dropped) are listed too, so a reader can tell them from changed values."""
    a, b = named(a), named(b)
    out = [f"{k} only {'before' if k in a else 'after'}" for k in sorted(set(a) ^ set(b))]
    return out + [f"{k} differs" for k in sorted(set(a) & set(b))
                  if not np.array_equal(a[k], b[k])]


def alternate(fns: dict, runs: int) -> dict:
    """Median seconds of each blocking call, the calls alternated run by run."""
    for fn in fns.values():  # compile and warm up
        jax.block_until_ready(fn())
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    return times


def compare_trainers(before, after, name: str, args) -> dict:
    """Both versions' whole trainers: the first steps' records, then one step at a time,
    alternated, timed."""
    trainers = {"before": whole_trainer(before, name, args.batch),
                "after": whole_trainer(after, name, args.batch)}
    records = {k: [(r["loss"], r["grad_norm"]) for r in t.run(args.trainer_steps)]
               for k, t in trainers.items()}
    times = alternate({k: (lambda t=t: t.run(1)) for k, t in trainers.items()}, args.runs)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"equal": records["before"] == records["after"], "records": records,
            "median_s": med, "times_s": times, "ratio": med["after"] / med["before"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision to compare against")
    parser.add_argument("--presets", nargs="*",
                        default=["tiny-fluid", "tiny-continuous-raster", "tiny-discrete-random",
                                 "tiny-discrete-raster"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--images", type=int, default=4, help="images per sampling call")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--trainer-steps", type=int, default=0,
                        help="also run each version's whole Trainer (data, step, EMA) for this "
                        "many steps: equal losses and gradient norms, and the ratio of its "
                        "median step time (0: skip)")
    parser.add_argument("--out", default=str(RESULTS / "ab.json"))
    args = parser.parse_args()

    import fluid

    info = {"conditions": conditions(), "before": args.before, "runs": args.runs,
            "batch": args.batch, "images": args.images, "presets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        before = import_revision(args.before, Path(tmp))
        print(f"{'preset':24} {'equal':>6} {'train before':>13} {'after':>8} {'ratio':>6} "
              f"{'sample before':>14} {'after':>8} {'ratio':>6}")
        for name in args.presets:
            calls, outputs = {}, {}
            for label, package in (("before", before), ("after", fluid)):
                model, data, config = setup(package, name, args.batch)
                calls[f"train_{label}"] = train_step(model, data)
                calls[f"sample_{label}"] = sampler(model, data, config, args.images)
                outputs[label] = (calls[f"train_{label}"]()[2:], calls[f"sample_{label}"]())
            diff = differences(outputs["before"], outputs["after"])
            equal = not any(d.endswith("differs") for d in diff)
            times = alternate(calls, args.runs)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"equal": equal, "differences": diff, "median_s": med, "times_s": times,
                   "train_ratio": med["train_after"] / med["train_before"],
                   "sample_ratio": med["sample_after"] / med["sample_before"]}
            info["presets"][name] = row
            print(f"{name:24} {equal!s:>6} {med['train_before']:13.4f} "
                  f"{med['train_after']:8.4f} {row['train_ratio']:6.3f} "
                  f"{med['sample_before']:14.4f} {med['sample_after']:8.4f} "
                  f"{row['sample_ratio']:6.3f}", flush=True)
            for d in diff:
                print(f"    {d}")
            if args.trainer_steps:
                row["trainer"] = compare_trainers(before, fluid, name, args)
                t = row["trainer"]
                row["equal"] = row["equal"] and t["equal"]
                print(f"    whole Trainer, {args.trainer_steps} steps: losses and gradient norms "
                      f"equal {t['equal']}; median step {t['median_s']['before']:.4f} s before, "
                      f"{t['median_s']['after']:.4f} s after, ratio {t['ratio']:.3f}", flush=True)
    print(f"wrote {write_json(args.out, finish(info))}")
    if not all(row["equal"] for row in info["presets"].values()):
        sys.exit("results differ between the two versions (see `equal` above)")


if __name__ == "__main__":
    main()
