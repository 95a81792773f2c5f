"""The `fluid` command: demo, train, sample, components, presets."""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"override {pair!r} must look like dotted.key=value")
        k, v = pair.split("=", 1)
        out[k] = v
    return out


def cmd_components(args) -> int:
    from .config import _registries

    for kind, registry in _registries().items():
        print(f"{kind} ({registry.group}):")
        for entry in registry.entries():
            print(f"  {entry.name:<16} {entry.source:<24} {entry.target}")
    return 0


def cmd_presets(args) -> int:
    from .build import abstract_model, count_params
    from .presets import PRESETS

    for name in sorted(PRESETS):
        config = PRESETS[name]()
        n = count_params(abstract_model(config.model))
        print(f"{name:<26} {n / 1e6:10.2f}M parameters")
    return 0


def _train_and_report(config, out: Path, *, time_budget=None, prompts=None, resume=True) -> dict:
    import jax.random as jr

    from .data.shapes import DEMO_PROMPTS
    from .sample import sample_images
    from .train import Trainer
    from .viz import save_grid, save_loss_curve

    t0 = time.perf_counter()
    trainer = Trainer(config, out_dir=out, resume=resume)
    print(f"training {config.steps} steps of batch {config.batch_size}; writing to {out}/")
    history = trainer.run(time_budget=time_budget)
    train_time = time.perf_counter() - t0
    trainer.save(out)
    prompts = list(prompts or DEMO_PROMPTS)
    t1 = time.perf_counter()
    images = sample_images(
        trainer.model(ema=True), trainer.text_tokenizer, prompts,
        text_len=config.model.text_len, key=jr.key(config.seed + 1),
        steps=config.sample_steps, cfg=config.sample_cfg, temperature=config.sample_temperature,
    )
    sample_time = time.perf_counter() - t1
    grid = save_grid(images, out / "samples.png", captions=prompts, cols=4)
    # The whole run's curve, steps before a resume included.
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = save_loss_curve(
        [r["step"] for r in logged], [r["loss"] for r in logged], out / "loss.png"
    )
    summary = {
        "steps": trainer.step,
        "final_loss_mean_of_last_50": float(sum(r["loss"] for r in history[-50:]) / max(len(history[-50:]), 1)),
        "train_seconds": train_time,
        "sample_seconds": sample_time,
        "samples": str(grid),
        "loss_curve": str(curve),
        "model": str(out / "model.eqx"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def cmd_demo(args) -> int:
    from .presets import get_config

    config = get_config("demo", **_overrides(args.override))
    out = Path(args.out)
    # The demo always trains from scratch: earlier checkpoints in its folder are replaced.
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    summary = _train_and_report(config, out, time_budget=args.time_budget, resume=False)
    print(f"\ndone in {summary['train_seconds'] + summary['sample_seconds']:.0f} s "
          f"({summary['steps']} steps, final loss {summary['final_loss_mean_of_last_50']:.4f})")
    print(f"samples:    {summary['samples']}")
    print(f"loss curve: {summary['loss_curve']}")
    print(f"model:      {summary['model']}")
    return 0


def _initialize_distributed() -> None:
    """`jax.distributed.initialize()` when launched as one of several processes.

    Signs of a multi-process launch: an explicit coordinator (`JAX_COORDINATOR_ADDRESS`),
    a TPU pod slice with several workers, or a SLURM job of several tasks; JAX reads the
    rest (process count and id) from the same environment.
    """
    env = os.environ
    several = (
        bool(env.get("JAX_COORDINATOR_ADDRESS"))
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or int(env.get("SLURM_NTASKS", "1")) > 1
    )
    if several:
        import jax

        jax.distributed.initialize()


def cmd_train(args) -> int:
    from .presets import get_config

    _initialize_distributed()

    config = get_config(args.preset, **_overrides(args.override))
    summary = _train_and_report(config, Path(args.out or f"runs/{args.preset}"))
    print(json.dumps(summary, indent=1))
    return 0


def cmd_sample(args) -> int:
    import jax.random as jr

    from .sample import sample_images
    from .train import load_model
    from .viz import save_grid

    model, text_tokenizer, config = load_model(args.checkpoint, ema=not args.raw)
    images = sample_images(
        model, text_tokenizer, args.prompt, text_len=config.model.text_len,
        key=jr.key(args.seed), steps=args.steps or config.sample_steps,
        cfg=config.sample_cfg if args.cfg is None else args.cfg,
        temperature=config.sample_temperature if args.temperature is None else args.temperature,
    )
    print(save_grid(images, args.out, captions=args.prompt))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluid", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train the Fluid variant on built-in shapes, write samples")
    p.add_argument("--out", default="fluid_demo")
    p.add_argument("--time-budget", type=float, default=13 * 60.0,
                   help="stop training after this many seconds (default 13 minutes)")
    p.add_argument("override", nargs="*", help="dotted.key=value overrides of the demo preset")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("train", help="train a preset")
    p.add_argument("preset")
    p.add_argument("override", nargs="*")
    p.add_argument("--out", default=None)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser(
        "sample", help="sample a grid from a run, one of its checkpoints, or a saved model"
    )
    p.add_argument("checkpoint", help="a run's --out directory (its latest checkpoint), "
                   "<run>/checkpoints/<step>, or a directory Trainer.save wrote")
    p.add_argument("--prompt", action="append", required=True,
                   help="a caption; repeat for several")
    p.add_argument("--out", default="samples.png")
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance scale (default: the run's sample_cfg)")
    p.add_argument("--steps", type=int, default=None,
                   help="generation steps (default: the run's sample_steps)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: the run's sample_temperature)")
    p.add_argument("--raw", action="store_true", help="raw weights instead of the EMA")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("components", help="list every registered component, plug-ins included")
    p.set_defaults(fn=cmd_components)

    p = sub.add_parser("presets", help="list presets with parameter counts")
    p.set_defaults(fn=cmd_presets)

    # Overrides may come before or after options (`train tiny-fluid --out run steps=2`),
    # which argparse alone does not allow for a trailing positional list.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "override") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.override = [*args.override, *extra]
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
