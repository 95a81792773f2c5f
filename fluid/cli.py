"""The `fluid` command: demo, train, train-tokenizer, sample, serve, eval, sweep, convert,
components, presets."""

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import warnings
from pathlib import Path

from ._errors import ConfigError, ConfigKeyError, UserError

DEBUG_ENV = "FLUID_DEBUG"


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigKeyError(f"override {pair!r} must look like dotted.key=value")
        k, v = pair.split("=", 1)
        out[k] = v
    return out


def cmd_components(args) -> int:
    from ._registry import SLOTS
    from .text import CAPTION_TOKENIZERS

    registries = {name: slot.registry for name, slot in SLOTS.items()}
    for kind, registry in {**registries, "caption_tokenizer": CAPTION_TOKENIZERS}.items():
        print(f"{kind} ({registry.group}):")
        for entry in registry.entries():
            print(f"  {entry.name:<16} {entry.source:<24} {entry.target}")
    return 0


def cmd_presets(args) -> int:
    from .build import count_params
    from .presets import PRESETS
    from .recipes import get_recipe

    for name in sorted(PRESETS):
        config = PRESETS[name]()
        n = count_params(get_recipe(config.task).abstract_model(config))
        print(f"{name:<26} {n / 1e6:10.2f}M parameters")
    return 0


def _train_and_report(config, out: Path, *, time_budget=None, resume=True):
    from .recipes import prepare

    recipe = prepare(config, out_dir=out, resume=resume)
    print(f"training {recipe.describe()}; writing to {out}/")
    return recipe, recipe.train_and_report(time_budget=time_budget)


def _plan(config, out: Path, what: str) -> int:
    """`--dry-run`: check everything a run needs (the config, its data, its parts, files they
    read) and say what it would do, training nothing."""
    from .build import count_params
    from .recipes import get_recipe, make_source

    source = make_source(config.data)
    n = count_params(get_recipe(config.task).abstract_model(config, source=source))
    data = config.data.dataset + (f" at {config.data.path}" if config.data.path else "")
    print(f"{what}: {n / 1e6:.2f}M parameters, {config.steps} steps of batch "
          f"{config.batch_size}, data {data} ({len(source)} records), writing to {out}/ "
          "(dry run: nothing trained)")
    return 0


def cmd_demo(args) -> int:
    from .presets import get_config
    from .run import RunFolder

    config = get_config("demo", **_overrides(args.override))
    out = Path(args.out)
    if args.dry_run:
        return _plan(config, out, "fluid demo would train the Fluid variant")
    # The demo always trains from scratch: earlier checkpoints in its folder are replaced.
    shutil.rmtree(RunFolder(out).checkpoints, ignore_errors=True)
    RunFolder(out).metrics.unlink(missing_ok=True)
    _, summary = _train_and_report(config, out, time_budget=args.time_budget, resume=False)
    print(f"\ndone in {summary['train_seconds'] + summary['sample_seconds']:.0f} s "
          f"({summary['steps']} steps, final loss {summary['final_loss_mean_of_last_50']:.4f})")
    print(f"samples:    {summary['samples']}")
    print(f"loss curve: {summary['loss_curve']}")
    print(f"model:      {summary['model']}")
    return 0


def _initialize_distributed() -> None:
    """`jax.distributed.initialize()` when launched as one of several processes.

    Signs of a multi-process launch: an explicit coordinator (`JAX_COORDINATOR_ADDRESS`),
    a TPU pod slice with several workers, or a SLURM job of several tasks. JAX reads the
    coordinator from the environment and finds the process count and id itself on a TPU pod
    or under SLURM; elsewhere they come from `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`, which
    JAX itself does not read.
    """
    env = os.environ
    several = (
        bool(env.get("JAX_COORDINATOR_ADDRESS"))
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or int(env.get("SLURM_NTASKS", "1")) > 1
    )
    if not several:
        return
    ids = {}
    for var, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if env.get(var):
            try:
                ids[arg] = int(env[var])
            except ValueError:
                raise ConfigError(f"{var}={env[var]!r} must be a whole number.") from None
    import jax

    try:
        jax.distributed.initialize(**ids)
    except ValueError as error:
        if "must be defined" not in str(error):
            raise
        # JAX found no cluster (TPU pod, SLURM, Open MPI, ...) that names the processes.
        raise ConfigError(
            f"{error} This looks like one of several processes (JAX_COORDINATOR_ADDRESS is "
            "set): set JAX_NUM_PROCESSES (how many) and JAX_PROCESS_ID (0 to "
            "JAX_NUM_PROCESSES - 1, different on each host) too."
        ) from None


def cmd_train(args) -> int:
    from .presets import get_config

    _initialize_distributed()

    config = get_config(args.preset, **_overrides(args.override))
    if args.dry_run:
        return _plan(config, Path(args.out or f"runs/{args.preset}"), f"would train {args.preset}")
    return _train(config, Path(args.out or f"runs/{args.preset}"))


def _train(config, out: Path) -> int:
    recipe, summary = _train_and_report(config, out)
    if recipe.is_main:
        print(json.dumps(summary, indent=1))
        for line in recipe.closing_lines(summary):
            print(line)
    return 0


def cmd_train_tokenizer(args) -> int:
    from .presets import get_config

    _initialize_distributed()

    config = get_config(args.preset, **_overrides(args.override))
    if config.task != "tokenizer":
        raise ConfigError(
            f"preset {args.preset!r} trains a generative model (use `fluid train`); "
            "train-tokenizer takes a tokenizer-* preset or task=tokenizer."
        )
    if args.dry_run:
        return _plan(config, Path(args.out or f"runs/{args.preset}"), f"would train {args.preset}")
    return _train(config, Path(args.out or f"runs/{args.preset}"))


def cmd_sample(args) -> int:
    from .convert import is_mar_folder, read_mar_folder
    from .pipeline import Pipeline, mar_pipeline, missing_vae, to_pil
    from .run import RunFolder, find_weights, is_pretrained, load_model, load_pretrained
    from .sample import read_prompts
    from .text import ClassLabelTokenizer, load_caption_tokenizer
    from .viz import check_figure_path, save_grid

    # Everything that can be refused is refused before the model is loaded or sampled.
    if args.prompts_file is not None:
        if args.classes is not None:
            raise ConfigError("give --prompts-file or --class, not both.")
        args.prompt = [*(args.prompt or []), *read_prompts(args.prompts_file)]
    if (args.prompt is None) == (args.classes is None):
        raise ConfigError(
            "give --prompt (captions, for a text-conditional model) or --class (class ids or "
            "names, for a class-conditional one)"
            + (", not both." if args.prompt is not None else "; repeat it for several.")
        )
    check_figure_path(args.out)
    if is_mar_folder(args.checkpoint):
        if args.vae is None:
            raise missing_vae(args.checkpoint)
        folder = read_mar_folder(args.checkpoint)
        # The classes are refused before the model is built.
        checked = _sample_prompts(args, ClassLabelTokenizer(
            folder.config["architecture"]["num_classes"]))
        print(f"loading the MAR model {args.checkpoint} with the autoencoder {args.vae}")
        pipeline = mar_pipeline(folder, vae=args.vae, ema=not args.raw)
    elif args.vae is not None:
        raise ConfigError(f"--vae is for a MAR model that `fluid convert mar` wrote; "
                          f"{args.checkpoint} is not one (a run names its tokenizer in its "
                          "config): leave --vae out.")
    elif is_pretrained(args.checkpoint):
        saved = RunFolder(args.checkpoint).text_tokenizer
        checked = _sample_prompts(args, load_caption_tokenizer(saved))
        print(f"loading the pretrained folder {args.checkpoint}")
        pipeline = Pipeline(*load_pretrained(args.checkpoint))
    else:
        weights = find_weights(args.checkpoint, ema=not args.raw)
        saved = RunFolder(weights.run_dir).text_tokenizer
        # Without a caption tokenizer (not a generative run), load_model says what is wrong.
        checked = _sample_prompts(args, load_caption_tokenizer(saved)) if saved.exists() else None
        print(f"loading {weights.describe()}")
        pipeline = Pipeline(*load_model(weights, ema=not args.raw))
    model = pipeline.model
    prompts, captions = checked or _sample_prompts(args, pipeline.text_tokenizer)
    prompts = [p for p in prompts for _ in range(args.per_prompt)]
    captions = [c for c in captions for _ in range(args.per_prompt)]
    if args.steps is not None and args.steps > model.seq_len:
        raise ConfigError(
            f"--steps {args.steps} is more than the model's {model.seq_len} tokens; give "
            f"--steps between 1 and {model.seq_len}."
        )
    # On every local device, in batches of --batch-size (one by default: what one call of
    # `sample_images` with `jr.key(seed)` draws), with a progress bar over the batches.
    images = pipeline.images(
        prompts, seed=args.seed, steps=args.steps, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
        temperature=args.temperature, batch_size=args.batch_size,
        negative_prompt=args.negative_prompt, progress=True, **_switch_args(args),
    )
    print(save_grid(images, args.out, captions=captions))
    if args.images_dir is not None:
        folder = Path(args.images_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(to_pil(images)):
            image.save(folder / f"{i:04d}.png")
        print(f"{len(images)} images in {folder}/ (0000.png: the first prompt's first image)")
    return 0


def cmd_serve(args) -> int:
    from .pipeline import load
    from .serve import serve

    print(f"loading {args.checkpoint}")
    pipeline = load(args.checkpoint, ema=not args.raw, vae=args.vae)

    def ready(url: str) -> None:
        print(f"serving at {url} (Ctrl-C stops)", flush=True)
        if not _is_loopback(args.host):
            print(f"warning: listening on {args.host}: whoever reaches this machine can use the "
                  "model (there is no authentication)", file=sys.stderr, flush=True)

    serve(pipeline, host=args.host, port=args.port, batch_size=args.batch_size,
          max_wait=args.batch_wait, log=lambda line: print(line, file=sys.stderr, flush=True),
          ready=ready)
    print("stopped", flush=True)
    return 0


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _switch_args(args) -> dict:
    """The fast-sampling switches of `fluid sample` and `fluid eval` as
    `FluidModel.generate`'s arguments (checked where they are used:
    `fluid.model.sampling_switches`)."""
    out = {}
    if args.cfg_interval is not None:
        out["cfg_interval"] = tuple(args.cfg_interval)
    if args.head_steps is not None:
        steps = args.head_steps
        out["head_steps"] = steps[0] if len(steps) == 1 else tuple(steps)
    if args.cfg_refresh is not None:
        out["cfg_refresh"] = args.cfg_refresh
    return out


def _add_switch_args(p) -> None:
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only the steps whose progress (fraction of tokens produced "
                   "before them) is in [LO, HI): e.g. 0 0.5 guides the first half and "
                   "halves the head's work on the rest (default: every step)")
    p.add_argument("--head-steps", type=_at_least(1, int), nargs="+", default=None,
                   metavar="N", help="chain length of a diffusion or flow head: one number for "
                   "every token, or several for a DiSA schedule over progress (e.g. 50 35 20 5: "
                   "many steps for the first tokens, few for the last; default: the head's own)")
    p.add_argument("--cfg-refresh", type=_at_least(1, int), default=None, metavar="K",
                   help="run guidance's unconditional backbone pass only every K guided steps "
                   "and reuse the residual between the conditions in between (LazyMAR; "
                   "bidirectional backbones; 1: every step; default: every step)")


def _sample_prompts(args, text_tokenizer) -> tuple[list[str], list[str]]:
    """The captions `fluid sample` feeds the model, and those it writes under the images:
    `--prompt` for a text-conditional model, `--class` (ids or names) for a
    class-conditional one (its caption tokenizer a `ClassLabelTokenizer`)."""
    from .recipes import grid_captions
    from .text import ClassLabelTokenizer

    by_class = isinstance(text_tokenizer, ClassLabelTokenizer)
    if args.classes is not None:
        if not by_class:
            raise ConfigError(
                f"{args.checkpoint} is a text-conditional model (its captions are read by "
                f"{type(text_tokenizer).__name__}); --class is for class-conditional models "
                "(the class_labels text encoder): give --prompt."
            )
        prompts = [str(text_tokenizer.label(c)) for c in args.classes]
    else:
        prompts = list(args.prompt)
        if by_class:
            words = [p for p in prompts if p.strip() and not (p.strip().isascii()
                                                              and p.strip().isdigit())]
            if words:
                raise ConfigError(
                    f"{args.checkpoint} is a class-conditional model "
                    f"({text_tokenizer.num_classes} classes), not a text one: give --class "
                    f"with a class id or name instead of --prompt {words[0]!r}."
                )
            for p in prompts:
                if p.strip():
                    text_tokenizer.label(p)  # in range, or refused naming the range
    return prompts, grid_captions(text_tokenizer, prompts)


def cmd_convert_mar(args) -> int:
    from .convert import convert_mar_checkpoint

    result = convert_mar_checkpoint(
        args.checkpoint, args.out, weights=args.weights, num_heads=args.num_heads
    )
    config, a = result.config, result.config["architecture"]
    taken = {"model_ema": "the EMA weights, which MAR evaluates with",
             "model": "the raw weights, not the EMA",
             "state_dict": "the file's top level, a bare state dict"}[config["weights"]]
    epoch = f", epoch {config['epoch']}" if config["epoch"] is not None else ""
    print(f"took {config['weights']!r} of {args.checkpoint} ({taken}{epoch})")
    print(f"MAR of width {a['width']}, {a['depth']} + {a['decoder_depth']} blocks, "
          f"{config['num_heads']} heads ({config['num_heads_from']}), diffusion head "
          f"{a['head_depth']} x {a['head_width']}, {a['num_classes']} classes, {a['seq_len']} "
          f"tokens of {a['token_dim']}: {a['parameters'] / 1e6:.2f}M parameters")
    print(f"wrote {result.folder}/ (config.json, model.safetensors); it loads without torch: "
          f"fluid.convert.read_mar_folder({str(result.folder)!r})")
    print(f"sample it: fluid sample {result.folder} --vae VAE/ --class 207, VAE/ being MAR's "
          "kl16.ckpt converted with `fluid convert ldm --mar kl16.ckpt VAE/`")
    return 0


def cmd_convert_ldm(args) -> int:
    from .convert import MAR_DECODER_EXCLUDE, check_new_folder
    from .tokenizers import MAR_SCALING_FACTOR, convert_ldm_checkpoint

    if args.mar == (args.scaling_factor is not None):
        raise ConfigError(
            "the latent scale is not in an LDM checkpoint: give --scaling-factor (0.18215 for "
            "Stable Diffusion 1.x/2.x's VAE) or --mar (MAR's kl16.ckpt), "
            + ("not both." if args.mar else "one of them.")
        )
    if args.scaling_factor is not None and not args.scaling_factor > 0:
        raise ConfigError(f"--scaling-factor must be > 0, got {args.scaling_factor}.")
    check_new_folder(args.out)
    scale = MAR_SCALING_FACTOR if args.mar else args.scaling_factor
    result = convert_ldm_checkpoint(
        args.checkpoint, args.out, scaling_factor=scale, sample_size=args.sample_size,
        exclude=[MAR_DECODER_EXCLUDE] if args.mar else [],
    )
    c = result.config
    print(f"read the autoencoder of {args.checkpoint}"
          + (f" under {result.prefix!r}" if result.prefix else "")
          + (f", leaving out {len(result.ignored)} other tensors" if result.ignored else ""))
    print(f"AutoencoderKL with channels {c['block_out_channels']}, {c['latent_channels']} "
          f"latent channels, latents scaled by {scale}")
    print(f"wrote {result.folder}/ (a diffusers folder); it loads without torch as the kl "
          f"tokenizer: model.tokenizer='{{\"name\": \"kl\", \"kwargs\": {{\"path\": "
          f"\"{result.folder}\", \"image_size\": {args.sample_size}}}}}'")
    return 0


def cmd_eval(args) -> int:
    from .eval import DEFAULT_SAMPLES, evaluate_checkpoint
    from .run import EvalReport

    own = args.data is not None or args.prompts is not None
    if not own:
        for flag in ("clip", "reference", "reference_count"):
            if getattr(args, flag) is not None:
                raise ConfigError(f"--{flag.replace('_', '-')} scores your own data: pass "
                                  "--data PATH or --prompts FILE with it.")
    extra = ({"data": args.data, "prompts": args.prompts, "clip": args.clip,
              "reference": args.reference, "reference_count": args.reference_count}
             if own else {})
    samples = args.samples if own or args.samples is not None else DEFAULT_SAMPLES
    result = evaluate_checkpoint(
        args.checkpoint, out=args.out, raw=args.raw, verbose=True, samples=samples,
        seed=args.seed,
        validation_examples=args.validation_examples, min_count=args.min_count,
        **extra, **_switch_args(args),
    )
    if own:
        _print_data_eval(result)
        print(f"report: {EvalReport(result['out']).markdown}")
        return 0
    val, fd = result["validation"], result["frechet"]
    print(f"validation loss {val['loss']:.4f} ({val['units']})")
    print(f"ShapesEval overall {result['shapes_eval']['overall']:.3f}")
    print(f"Frechet distance {fd['distance']:.3f} ({fd['samples']} samples"
          f"{', rough' if fd['rough'] else ''})")
    print(f"report: {EvalReport(result['out']).markdown}")
    return 0


def _print_data_eval(result: dict) -> None:
    val, clip, fd = result["validation"], result["clip_score"], result["frechet"]
    if val is not None:
        print(f"validation loss {val['loss']:.4f} ({val['units']}, {val['examples']} "
              "held-out pairs)")
    if clip is not None:
        print(f"CLIPScore {clip['score']:.3f} ({clip['samples']} images)")
    if fd is not None:
        print(f"Frechet distance {fd['distance']:.3f} ({fd['extractor']}, {fd['samples']} "
              f"samples vs {fd['reference_count']} real images"
              f"{', rough' if fd['rough'] else ''})")


def cmd_sweep(args) -> int:
    from .eval import run_sweep

    out = Path(args.out or f"runs/sweep-{args.scale}")
    if args.dry_run:
        return _plan_sweep(args, out)
    report = run_sweep(
        out, scale=args.scale, variants=args.variants, sizes=args.sizes, steps=args.steps,
        samples=args.samples, seeds=args.seeds, options=_sweep_options(args),
    )
    for variant, fit in report["fits"].items():
        spread = fit["alpha_over_seeds"]
        over_seeds = "" if spread["low"] is None else (
            f"; alpha over {spread['n']} seeds {spread['mean']:.4f} "
            f"[{spread['low']:.4f}, {spread['high']:.4f}]"
        )
        print(f"{variant:<18} L = {fit['a']:.4g} * N^-{fit['alpha']:.4f}{over_seeds}")
    print(f"report: {out / 'sweep.md'} ({report['seconds']:.0f} s)")
    return 0


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {text!r}")
    return int(text)


def _at_least(low, kind):
    """An argparse type: a number of `kind` (int or float) no smaller than `low`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if math.isnan(value) or value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


@contextlib.contextmanager
def _one_line_warnings():
    """Warnings as `warning: <message>` lines, without the source line Python echoes."""
    from tqdm.auto import tqdm

    def show(message, category, filename, lineno, file=None, line=None):
        del filename, lineno, line
        # Above a progress bar, not through it.
        tqdm.write(f"warning: {message}", file=file or sys.stderr)

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _sweep_options(args) -> dict:
    """The `SweepScale` fields the sweep's flags change."""
    given = {"mask_schedule": args.mask_schedule, "lr_width_exponent": args.lr_width_exponent,
             "style": args.style}
    return {k: v for k, v in given.items() if v is not None}


def _plan_sweep(args, out: Path) -> int:
    from .build import count_params
    from .eval import scale_setting, sweep_config, sweep_run_name
    from .recipes import get_recipe

    scale = scale_setting(args.scale, _sweep_options(args))
    sizes = args.sizes or scale.sizes
    seeds = scale.seeds if args.seeds is None else args.seeds
    for seed in range(seeds):
        for variant in args.variants:
            for size in sizes:
                config = sweep_config(variant, size, scale, steps=args.steps, seed=seed)
                n = count_params(get_recipe(config.task).abstract_model(config))
                print(f"{sweep_run_name(variant, size, seed)}: {n / 1e6:.2f}M parameters, "
                      f"{config.steps} steps, seed {seed}")
    print(f"would write {len(args.variants) * len(sizes) * seeds} runs to {out}/ (dry run: "
          "nothing trained)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the `fluid` command; returns its exit status.

    Exit status: 0 on success; 2 for a usage error or a `fluid.UserError` (a bad value, a
    missing or damaged file: its message alone is printed); 130 after Ctrl-C (training saves
    a checkpoint first); an internal error shows its traceback. `--debug` (anywhere on the
    line) or `FLUID_DEBUG=1` shows every traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = _parser()
    # Overrides may come before or after options (`train tiny-fluid --out run steps=2`),
    # which argparse alone does not allow for a trailing positional list.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "override") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.override = [*args.override, *extra]
    if debug:
        return args.fn(args)
    try:
        with _one_line_warnings():
            return args.fn(args)
    except KeyboardInterrupt as interrupt:
        # `TrainingInterrupted` says which step was saved; elsewhere nothing was in flight.
        print(f"\n{interrupt or 'interrupted'}", file=sys.stderr)
        return 130
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        print(f"(--debug or {DEBUG_ENV}=1 shows where it was raised)", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluid", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help=f"show tracebacks of user errors too (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train the Fluid variant on built-in shapes, write samples")
    p.add_argument("--out", default="fluid_demo")
    p.add_argument("--time-budget", type=_at_least(0.0, float), default=13 * 60.0,
                   help="stop training after this many seconds (default 13 minutes)")
    p.add_argument("override", nargs="*", help="dotted.key=value overrides of the demo preset")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, data and parts and say what would run; train nothing")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("train", help="train a preset")
    p.add_argument("preset")
    p.add_argument("override", nargs="*")
    p.add_argument("--out", default=None)
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, data and parts and say what would run; train nothing")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser(
        "train-tokenizer",
        help="train a kl or vq image tokenizer (a tokenizer-* preset); writes <out>/tokenizer/",
    )
    p.add_argument("preset")
    p.add_argument("override", nargs="*")
    p.add_argument("--out", default=None)
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, data and parts and say what would run; train nothing")
    p.set_defaults(fn=cmd_train_tokenizer)

    p = sub.add_parser(
        "sample", help="sample a grid from a run, one of its checkpoints, a saved model or a "
        "pretrained folder"
    )
    p.add_argument("checkpoint", help="a run's --out directory (its latest checkpoint), "
                   "<run>/checkpoints/<step>, a directory Recipe.save wrote, or a MAR model "
                   "`fluid convert mar` wrote (with --vae)")
    p.add_argument("--vae", default=None, metavar="FOLDER",
                   help="for a MAR model only, and needed there: its KL autoencoder, "
                   "kl16.ckpt converted with `fluid convert ldm --mar kl16.ckpt FOLDER`")
    p.add_argument("--prompt", action="append", default=None,
                   help="a caption; repeat for several")
    p.add_argument("--class", dest="classes", action="append", default=None, metavar="CLASS",
                   help="for a class-conditional model (the class_labels text encoder), "
                   "instead of --prompt: a class id (207) or, for a run trained on "
                   "data.dataset=imagefolder, a class folder's name; repeat for several")
    p.add_argument("--prompts-file", default=None,
                   help="a text file of prompts, one per line (with or instead of --prompt)")
    p.add_argument("--per-prompt", type=_at_least(1, int), default=1,
                   help="images of each prompt or class (default 1)")
    p.add_argument("--out", default="samples.png", help="the captioned grid")
    p.add_argument("--images-dir", default=None,
                   help="also write one PNG per image here (0000.png, 0001.png, ...)")
    p.add_argument("--cfg", type=_at_least(0.0, float), default=None,
                   help="guidance scale >= 0: 1 is the conditional model, 0 unconditional "
                   "(default: the run's sample_cfg)")
    p.add_argument("--cfg-schedule", choices=("linear", "constant"), default=None,
                   help="guidance over the steps (default: linear for a random order, as "
                   "MAR; constant for raster, as LlamaGen)")
    _add_switch_args(p)
    p.add_argument("--negative-prompt", default=None,
                   help="a caption the images are pushed away from: guidance's "
                   "unconditional half reads it in place of the empty caption (needs cfg "
                   "above 1)")
    p.add_argument("--steps", type=_at_least(1, int), default=None,
                   help="generation steps, 1 to the model's token count (default: the run's "
                   "sample_steps; a raster model makes one token per step whatever this is)")
    p.add_argument("--temperature", type=_at_least(0.0, float), default=None,
                   help="sampling temperature >= 0 (default: the run's sample_temperature)")
    p.add_argument("--raw", action="store_true", help="raw weights instead of the EMA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_at_least(1, int), default=None,
                   help="images per compiled call (default: all at once); batch b > 0 samples "
                   "with fold_in(key(seed), b)")
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser(
        "serve", help="a local web page and JSON API that sample from a run or pretrained folder",
        description="Serve a sampling page at http://HOST:PORT/ (prompt, negative prompt, seed, "
        "steps, guidance; a grid of results) and a JSON API: GET /api/info, POST /api/generate "
        '{"prompt": ..., "seed": ..., "steps": ..., "cfg": ..., "num_images": ...}. Concurrent '
        "requests with the same steps and guidance are sampled by one call of --batch-size "
        "images; a request's images depend on its own prompt and seed alone. Ctrl-C stops.",
    )
    p.add_argument("checkpoint", metavar="RUN", help="a run's --out directory, "
                   "<run>/checkpoints/<step>, a pretrained folder, or a MAR model `fluid "
                   "convert mar` wrote (with --vae)")
    p.add_argument("--vae", default=None, metavar="FOLDER",
                   help="for a MAR model only, and needed there: its KL autoencoder, "
                   "kl16.ckpt converted with `fluid convert ldm --mar kl16.ckpt FOLDER`")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="default 8000; 0: any free port")
    p.add_argument("--batch-size", type=_at_least(1, int), default=4,
                   help="images per sampling call, and the most one request may ask for "
                   "(default 4)")
    p.add_argument("--batch-wait", type=_at_least(0.0, float), default=0.05,
                   help="seconds a request waits for others to share its call (default 0.05)")
    p.add_argument("--raw", action="store_true", help="raw weights instead of the EMA")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser(
        "eval", help="validation loss, ShapesEval and Frechet distance of a run or checkpoint "
        "(on shapes, or on your --data / --prompts with CLIPScore and CLIP features)"
    )
    p.add_argument("checkpoint", help="a run's --out directory (its latest checkpoint), "
                   "<run>/checkpoints/<step>, or a directory Recipe.save wrote")
    p.add_argument("--samples", type=_at_least(1, int), default=None,
                   help="images generated for ShapesEval and the Frechet distance (default "
                   "192, 32 per category: the fewest for the 191 ShapesFeatures); with "
                   "--data or --prompts, one per caption of a seeded subset (default: one per "
                   "pair, at most 1024, or per prompt; captions repeat if you ask for more)")
    own = p.add_mutually_exclusive_group()
    own.add_argument("--data", default=None, metavar="PATH",
                     help="evaluate on your image-caption pairs instead of shapes: a folder "
                     "of images with same-named .txt captions or a JSONL file, as fluid train "
                     "reads them; validation loss on --validation-examples held-out pairs "
                     "picked by --seed")
    own.add_argument("--prompts", default=None, metavar="FILE",
                     help="evaluate on prompts, one per line: CLIPScore (needs --clip), and "
                     "the Frechet distance if --reference images are given")
    p.add_argument("--clip", default=None, metavar="FOLDER",
                   help="a Hugging Face CLIP folder (CLIPModel.save_pretrained, with its "
                   "tokenizer): CLIPScore of the generated images against their captions and "
                   "the Frechet distance of CLIP image features to the real images'")
    p.add_argument("--reference", default=None, metavar="PATH",
                   help="real images for the Frechet distance (a folder of images or a JSONL "
                   "file of pairs); default: --data's images")
    p.add_argument("--reference-count", type=_at_least(1, int), default=None,
                   help="real images summarised for the Frechet distance, a seeded subset "
                   "(default all, at most 10000); cached with their count and seed")
    p.add_argument("--out", default=None,
                   help="report directory (default <run>/eval or <run>/eval/step_<n>)")
    p.add_argument("--validation-examples", type=_at_least(1, int), default=256,
                   help="held-out examples of the validation loss (with --data: the first "
                   "of the pairs in an order drawn from --seed, all of them if fewer)")
    p.add_argument("--min-count", type=_at_least(2, int), default=None,
                   help="accept fewer samples than the features' dimension + 1 (192 for "
                   "ShapesFeatures) for a rough Frechet distance")
    p.add_argument("--raw", action="store_true", help="raw weights instead of the EMA")
    p.add_argument("--seed", type=int, default=0)
    _add_switch_args(p)
    p.set_defaults(fn=cmd_eval)

    from .data.shapes import STYLES
    from .eval import SCALES
    from .presets import ALL_VARIANTS, VARIANTS

    p = sub.add_parser(
        "sweep", help="train the four variants at several sizes, fit loss against parameters",
        description="Each (variant, size) is a run in <out>/<variant>-<size>/ (and, with "
        "--seeds N, <variant>-<size>-seed<k>/ for seeds k = 1 to N-1), evaluated as "
        "`fluid eval` does; finished runs are reused when the command runs again, so adding "
        "seeds to a finished sweep trains only the new ones. Over several seeds the report "
        "gives each measure's mean with a 95% Student-t interval and each variant's "
        "exponent fitted per seed. The default "
        "scale (small: 4 variants x 3 sizes x 3 seeds x 200 steps) took 40 minutes on an "
        "idle 2-core CPU; medium and large are for "
        "hours on a CPU or a GPU.",
    )
    p.add_argument("--scale", default="small", choices=sorted(SCALES),
                   help="data, sizes, steps and evaluation (default small)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=ALL_VARIANTS,
                   help="default: the paper's four; continuous-arpg and discrete-arpg add "
                   "random order with a KV cache")
    p.add_argument("--sizes", nargs="+", default=None,
                   help="sizes w<width>d<depth> (default: the scale's)")
    p.add_argument("--steps", type=_at_least(1, int), default=None,
                   help="steps per run (default: the scale's)")
    p.add_argument("--samples", type=_at_least(1, int), default=None,
                   help="images per evaluation (default: the scale's)")
    p.add_argument("--seeds", type=_at_least(1, int), default=None,
                   help="runs per (variant, size), seeds 0 to N-1: each sets the model's "
                   "initialisation, the data and the evaluation's sampling (default: the "
                   "scale's: 3 for small, 1 for the others, where 1 gives no intervals)")
    p.add_argument("--mask-schedule", choices=("cosine", "mar"), default=None,
                   help="masked fractions of the random-order variants in training: cosine "
                   "over [0, 1] as Fluid (the scales' default), or mar (at least 70%% masked)")
    p.add_argument("--lr-width-exponent", type=_at_least(0, float), default=None,
                   help="learning rate times (first size's width / width) ** this: 0 (the "
                   "default, the paper's) gives every size one rate; 1 scales it as 1 / width")
    p.add_argument("--style", choices=STYLES, default=None,
                   help="shapes drawn flat, or shaded (gradients, soft edges, noise: what a "
                   "palette of discrete colours cannot reproduce); default: the scale's")
    p.add_argument("--out", default=None, help="default runs/sweep-<scale>")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, data and parts and say what would run; train nothing")
    p.set_defaults(fn=cmd_sweep)

    from .convert import MAR_WEIGHTS

    p = sub.add_parser(
        "convert", help="convert MAR's checkpoints (the model, its autoencoder) into folders "
        "fluid loads without torch",
        description="Read a checkpoint torch.save wrote, with torch's weights-only loader "
        "(torch is needed for this step alone; nothing the file names is run), and write a "
        "folder of config.json and safetensors that fluid reads without torch. OUT must not "
        "exist yet (or be empty); it appears complete or not at all.",
    )
    kinds = p.add_subparsers(dest="kind", required=True)
    q = kinds.add_parser(
        "mar", help="MAR's model (LTH14/mar checkpoint-last.pth) to a folder of MAR's weights",
        description="MAR's checkpoint holds `model`, `model_ema` and training state; one "
        "state dict is written as OUT/model.safetensors under MAR's names, with "
        "OUT/config.json (which weights, the architecture read from the tensors, the "
        "attention heads). Read it with fluid.convert.read_mar_folder; "
        "fluid.build.load_mar(folder.tensors, **folder.load_kwargs) builds its parts.",
    )
    q.add_argument("checkpoint", help="MAR's .pth file")
    q.add_argument("out", help="the folder to write")
    q.add_argument("--weights", choices=MAR_WEIGHTS, default=None,
                   help="which state dict (default: model_ema if the file has it, else model)")
    q.add_argument("--num-heads", type=_at_least(1, int), default=None,
                   help="attention heads (not in the weights); default: MAR's for its released "
                   "widths (12 for MAR-B's 768, 16 for MAR-L's 1024 and MAR-H's 1280), "
                   "required for any other width")
    q.set_defaults(fn=cmd_convert_mar)
    q = kinds.add_parser(
        "ldm", help="an LDM-layout KL autoencoder (MAR's kl16.ckpt, Stable Diffusion's "
        "original VAE) to a diffusers folder, the kl tokenizer's path",
        description="The latent scale is not in the file: give --scaling-factor, or --mar for "
        "MAR's kl16.ckpt (scale 0.2325, and the decoder MAR's code builds: it has no "
        "attention in its levels and ignores such weights, which are left out).",
    )
    q.add_argument("checkpoint", help="a .ckpt/.pth file, or an LDM-layout .safetensors file")
    q.add_argument("out", help="the folder to write")
    q.add_argument("--scaling-factor", type=float, default=None,
                   help="the latent scale its users apply (0.18215: Stable Diffusion 1.x/2.x)")
    q.add_argument("--mar", action="store_true",
                   help="MAR's kl16.ckpt: scale 0.2325 and MAR's decoder")
    q.add_argument("--sample-size", type=_at_least(1, int), default=256,
                   help="the image size recorded in config.json (default 256)")
    q.set_defaults(fn=cmd_convert_ldm)

    p = sub.add_parser("components", help="list every registered component, plug-ins included")
    p.set_defaults(fn=cmd_components)

    p = sub.add_parser("presets", help="list presets with parameter counts")
    p.set_defaults(fn=cmd_presets)
    return parser


if __name__ == "__main__":
    sys.exit(main())
