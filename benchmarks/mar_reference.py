"""MAR's own PyTorch code timed on this machine: the reference issue 6 measures fluid against.

    git clone https://github.com/LTH14/mar /tmp/mar
    pip install --no-deps timm==0.9.12
    python benchmarks/mar_reference.py --mar /tmp/mar                 # train mar512, mar256; sampling
    python benchmarks/mar_reference.py --mar /tmp/mar --what sample --runs 5 --with-fluid
    python benchmarks/mar_reference.py --mar /tmp/mar --what mar512 mar256 --runs 3 \
        --flop-steps 5 --with-fluid                                   # issue 16: train

Issue 6 quotes MAR's figures from a 2-core CPU of "this kind" (train step 9.6 s at width 512,
2.3 s at width 256; sampling 21.9 s for 4 images), but the host under that kind changes
between sessions (`peak.py` has read 129 to 183 GFLOP/s). Timing MAR's code beside fluid's,
in the same session, gives ratios that do not depend on the host. Nothing of MAR is copied
here: the script imports `models.mar.MAR` from the checkout you name, on the CPU.

- `.cuda()` is made a no-op (MAR's code calls it on fresh tensors);
- timm imports torchvision at start-up, and PyPI's torchvision does not load beside the CPU
  torch the `reference` extra pins; if it is missing, an empty stand-in module is installed
  for timm's imports (MAR uses only timm's `Block`, which needs none of torchvision);
- configurations: `_common.REFERENCES` as MAR's arguments (`mar_kwargs`): `mar512` (width
  512, 4 + 4 blocks, head 3 x 512) and `mar256` (width 256, 2 + 2 blocks, head 3 x 256),
  256 tokens of 16 channels (MAR's 16-channel KL tokens at 256 px), buffer 64, batch
  multiplier 4, batch 8 for training; sampling at `sampling.MAR_REFERENCE` (`mar256`,
  batch 4, 16 steps, guidance 3, linear), 100 diffusion steps, temperature 1;
- the train step is MAR's `forward` (loss), `backward`, gradient clipping at 3.0, AdamW
  (betas 0.9, 0.95; weight decay 0.02) and an EMA update, in float32;
- matmul FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on one step (MAR
  drops a random 70-100% of tokens from its encoder, so the count is of the measured step's
  draw, averaged over `--flop-steps` draws), and MFU is against `results/peak_<backend>.json`
  (jax's measured float32 peak; run `peak.py` in the same session).

With `--with-fluid` (issue 16), fluid runs in the same process, alternated call by call
with MAR's code (the order reversed every other round), so both see the same load:

- train: fluid's `Trainer` step (`prepare`'s trainer, its own jitted step) on MAR's
  composition at exactly `mar_kwargs`' sizes (`fluid_mar_config`: class labels, the `mae`
  backbone, buffer 64, the diffusion head with batch multiplier 4, MAR's mask ratios, label
  dropout 0.1, dropout 0.1; batch 8, float32, AdamW 0.9 / 0.95, weight decay 0.02, clipping
  3.0, EMA 0.9999), fed random tokens and class labels. Its FLOPs are XLA's count of the
  compiled step with every scan unrolled (as `mfu.py`), products alone (`xla_dot_flops`:
  matmuls and attention, what torch's counter counts) and all operations (`xla_flops`).
  fluid's encoder always runs over the slots of MAR's least-masked draw (76 known tokens at
  256); MAR's encoder over the draw's known tokens, one draw per batch. So MAR's count is
  given twice: averaged over `--flop-steps` draws, and at 76 known tokens (its mask ratio
  fixed there for one counted step: the same computation as fluid's);
- sampling: fluid's sampler on the same composition (`mae` backbone, `mar256`) at
  `sampling.MAR_REFERENCE` (tokens only, as `sample_tokens`), and the bidirectional
  backbone's `mar256` sampler (`sampling.py`'s model) as before.

`results/mar_reference.json`: per configuration `params` (MAR's trainable ones),
`step_s_median`, `step_times`, `train_flops_per_step`, `train_flops_draws`,
`achieved_gflops`, `mfu`, and with `--with-fluid` `train_flops_at_fluid_slots` and `fluid`
(`step_s_median`, `step_times`, `images_per_s`, `images_per_s_over_mar`, `params`,
`encoder_slots`, `xla_dot_flops`, `xla_flops`, `dot_flops_over_mar_at_same_known`,
`dot_flops_over_mar_mean_draw`, `compile_s`); for sampling `sample_s_median`,
`sample_times`, `images_per_s`, `sample_flops_per_image` (one call counted), and with
`--with-fluid` `fluid_mae_sample_s_median`, `fluid_mae_speedup_same_session`,
`fluid_sample_s_median`, `fluid_speedup_same_session`, `fluid_speedup_vs_issue_figure`;
`torch_threads`, `conditions` (with `uptime` at the start and the end).
"""

import argparse
import dataclasses
import importlib.abc
import importlib.machinery
import sys
import time
import types
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    MAR_TOKENIZER,
    REFERENCES,
    RESULTS,
    conditions,
    finish,
    model_config,
    read_peak,
    write_json,
)
from sampling import MAR_REFERENCE, captions, generate_fn
from sampling import build as build_fluid

from fluid.build import compose, count_params
from fluid.config import DataConfig, OptimConfig, TrainConfig
from fluid.presets import mar_model_config
from fluid.recipes import prepare
from fluid.train import shard_batch

MAR_CLASSES = 1000  # MAR's class embedding: ImageNet's classes (its `class_num`)

# The issue's MAR train-step figures (seconds per step at batch 8); its sampling figure is
# `sampling.MAR_REFERENCE`.
ISSUE_STEP_S = {"mar512": 9.6, "mar256": 2.3}


def mar_kwargs(name: str) -> dict:
    """MAR's constructor arguments for the reference configuration `name` of
    `_common.REFERENCES`, so that both codes are timed at one set of sizes: fluid's
    backbone blocks split evenly into MAR's encoder and decoder, the same attention heads and
    diffusion head, 256 tokens of 16 channels (MAR's 16x KL tokens at 256 px), buffer 64."""
    config = model_config(name)
    backbone, head = config.backbone.kwargs, config.head.kwargs
    depth = backbone["depth"] // 2
    return {"img_size": 256, "vae_stride": 16, "patch_size": 1, "vae_embed_dim": 16,
            "buffer_size": 64, "encoder_embed_dim": config.width, "encoder_depth": depth,
            "encoder_num_heads": backbone["num_heads"], "decoder_embed_dim": config.width,
            "decoder_depth": backbone["depth"] - depth,
            "decoder_num_heads": backbone["num_heads"], "diffloss_d": head["depth"],
            "diffloss_w": head["width"], "num_sampling_steps": "100",
            "diffusion_batch_mul": head["batch_mul"]}


def _stand_in_torchvision() -> None:
    """An importable, empty `torchvision` for timm's start-up imports."""

    class Meta(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            sub = Meta(name, (cls,), {})  # a distinct class per name: timm keys dicts by them
            type.__setattr__(cls, name, sub)
            return sub

    class Missing(metaclass=Meta):
        def __init__(self, *args, **kwargs):
            pass

    class Module(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return getattr(Missing, name)

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name == "torchvision" or name.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            module = Module(spec.name)
            module.__path__ = []
            module.__version__ = "0.0"
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())


def load_mar(path: str):
    """MAR's model class from a checkout of LTH14/mar, made to run on the CPU."""
    import torch

    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):  # PyPI's build beside a CPU torch: RuntimeError
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        _stand_in_torchvision()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    sys.path.insert(0, str(Path(path).resolve()))
    from models.mar import MAR

    return MAR


def alternate(calls: dict, *, warmup: int, runs: int) -> dict[str, list[float]]:
    """Wall times of each call of `calls`, run in turn (the order reversed every other
    round), so that all of them see the same load; `warmup` untimed rounds first."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times = {name: [] for name in calls}
    for i in range(runs):
        for name in (list(calls) if i % 2 == 0 else list(calls)[::-1]):
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    return times


class _FixedMaskRatio:
    """A stand-in for MAR's `mask_ratio_generator` that always draws `ratio`."""

    def __init__(self, ratio: float):
        self.ratio = ratio

    def rvs(self, size):
        return np.full(size, self.ratio)


def train(MAR, name: str, *, batch: int, warmup: int, runs: int, flop_steps: int,
          with_fluid: bool = False) -> dict:
    """MAR's train step at configuration `name`: its time, and its matmul FLOPs by torch's
    counter, averaged over `flop_steps` draws of its mask ratio. With `with_fluid`, fluid's
    train step at the same configuration (`fluid_train`) is alternated with it call by
    call, and MAR's FLOPs are also counted at the number of known tokens fluid's encoder
    has slots for (its mask ratio fixed there), the count fluid's step computes whatever
    its draw."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    np.random.seed(0)  # MAR draws its orders and mask ratios with NumPy
    model = MAR(**mar_kwargs(name))
    model.train()
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02)
    latents = torch.randn(batch, 16, 16, 16)
    labels = torch.randint(0, 1000, (batch,))

    def step():
        loss = model(latents, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.mul_(0.9999).add_(p.detach(), alpha=1 - 0.9999)
        return float(loss.detach())

    def count() -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        return counter.get_total_flops()

    flops = [count() for _ in range(flop_steps)]
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = {"config": name, "batch_size": batch, "params": params,
              "train_flops_per_step": float(np.mean(flops)), "train_flops_draws": flops,
              "issue_step_s": ISSUE_STEP_S.get(name)}
    calls = {"mar": step}
    if with_fluid:
        fluid_step, info = fluid_train(name, batch=batch)
        slots = info["encoder_slots"]
        seq_len = model.seq_len
        draw = model.mask_ratio_generator
        model.mask_ratio_generator = _FixedMaskRatio((seq_len - slots) / seq_len)
        result["train_flops_at_fluid_slots"] = count()
        model.mask_ratio_generator = draw
        calls["fluid"] = fluid_step
    times = alternate(calls, warmup=warmup, runs=runs)
    step_s = float(np.median(times["mar"]))
    result.update({"step_s_median": step_s, "step_times": times["mar"],
                   "images_per_s": batch / step_s})
    result["achieved_gflops"] = result["train_flops_per_step"] / step_s / 1e9
    peak = read_peak()
    if peak:
        result["peak_gflops_float32"] = peak["peak"]["float32"]["gflops"]
        result["mfu"] = result["achieved_gflops"] / result["peak_gflops_float32"]
    if with_fluid:
        fluid_s = float(np.median(times["fluid"]))
        result["fluid"] = {
            **info, "step_s_median": fluid_s, "step_times": times["fluid"],
            "images_per_s": batch / fluid_s,
            "images_per_s_over_mar": step_s / fluid_s,
            "dot_flops_over_mar_at_same_known": info["xla_dot_flops"]
            / result["train_flops_at_fluid_slots"],
            "dot_flops_over_mar_mean_draw": info["xla_dot_flops"]
            / result["train_flops_per_step"],
            "achieved_gflops": info["xla_dot_flops"] / fluid_s / 1e9,
        }
    return result


def fluid_mar_config(name: str) -> TrainConfig:
    """fluid's run of MAR's composition (`fluid.presets`' `mar-*`: class labels, the `mae`
    backbone, the diffusion head, MAR's random order and its mask ratios, label dropout
    0.1) at exactly the sizes `mar_kwargs(name)` gives MAR, trained as MAR trains: batch 8,
    float32, AdamW (0.9, 0.95), weight decay 0.02 on what MAR decays, clipping at 3.0, EMA
    0.9999. Tokens are fed directly (`_common.MAR_TOKENIZER`: 256 of 16 channels)."""
    k = mar_kwargs(name)
    if k["encoder_embed_dim"] != k["decoder_embed_dim"] or (
            k["encoder_num_heads"] != k["decoder_num_heads"]):
        raise ValueError(f"{name}: fluid's mae backbone has one width and one head count.")
    model = mar_model_config(
        MAR_TOKENIZER, width=k["encoder_embed_dim"], depth=k["encoder_depth"],
        heads=k["encoder_num_heads"], decoder_depth=k["decoder_depth"],
        head={"width": k["diffloss_w"], "depth": k["diffloss_d"],
              "batch_mul": k["diffusion_batch_mul"], "sampling_steps": int(k["num_sampling_steps"])},
        num_classes=MAR_CLASSES, buffer_size=k["buffer_size"],
    )
    return TrainConfig(model=model, batch_size=8, steps=1000, precision="float32",
                       optim=OptimConfig(b1=0.9, b2=0.95, weight_decay=0.02, grad_clip=3.0,
                                         ema_decay=0.9999, decay_rules="mar"),
                       data=DataConfig(image_size=32, fit_images=64))


def fluid_train(name: str, *, batch: int, count_flops: bool = True):
    """fluid's `Trainer` step (its own jitted step: AdamW, clipping, EMA, donation) on
    `fluid_mar_config(name)`, compiled: a call that runs one step on random tokens and
    class labels and blocks until it is done, and XLA's FLOPs of the step (with every scan
    unrolled, as `mfu.py` counts them: `xla_dot_flops`, the products alone, as torch's
    counter counts; `xla_flops`, every operation)."""
    from mfu import _cost, unrolled_scans, xla_flops

    config = dataclasses.replace(fluid_mar_config(name), batch_size=batch)
    trainer = prepare(config, progress=False).trainer
    model = trainer.model(ema=False)
    rng = np.random.default_rng(0)
    ids = np.full((batch, config.model.text_len), MAR_CLASSES, np.int32)
    ids[:, 0] = rng.integers(0, MAR_CLASSES, batch)
    mask = np.arange(config.model.text_len)[None].repeat(batch, 0) < 1
    tokens = rng.standard_normal((batch, model.seq_len, model.tokenizer.token_dim))
    data = shard_batch({"tokens": tokens.astype(np.float32), "text_ids": ids,
                        "text_mask": mask}, trainer.mesh)
    t0 = time.perf_counter()
    compiled = trainer.step_fn.lower(trainer.state, trainer.frozen, data).compile()
    info = {"compile_s": time.perf_counter() - t0,
            "params": count_params(eqx.filter(model, eqx.is_inexact_array))
            - count_params(model.tokenizer),
            "xla_flops_rolled": float(_cost(compiled)["flops"])}
    if count_flops:
        with unrolled_scans():
            lowered = trainer.step_fn.lower(trainer.state, trainer.frozen, data)
            info["xla_flops"], info["xla_dot_flops"] = xla_flops(lowered)
    info["encoder_slots"] = model.order.max_num_known(model.seq_len)
    state = trainer.state

    def step():
        nonlocal state
        state, metrics = compiled(state, trainer.frozen, data)
        return float(jax.block_until_ready(metrics)["loss"])

    return step, info


def fluid_sampler():
    """fluid's jitted sampler at `sampling.MAR_REFERENCE`'s settings, compiled, as
    `benchmarks/sampling.py` builds it: a call that blocks until the images are ready."""
    import jax.random as jr

    ref = MAR_REFERENCE
    config = model_config(ref["config"], "fluid")
    model = build_fluid(config)
    ids, mask = captions(config, ref["batch"])
    generate, params = generate_fn(model, steps=ref["steps"], cfg=ref["cfg"])
    compiled = generate.lower(params, ids, mask, jr.key(1)).compile()
    return lambda: compiled(params, ids, mask, jr.key(1)).block_until_ready()


def fluid_mae_sampler():
    """fluid's sampler on MAR's composition (`fluid_mar_config`, the `mae` backbone) at
    `sampling.MAR_REFERENCE`'s settings (linear guidance, temperature 1, the head's 100
    diffusion steps), compiled: a call that samples the tokens of `batch` random classes
    (as MAR's `sample_tokens`, without decoding) and blocks until they are ready."""
    import jax.random as jr

    ref = MAR_REFERENCE
    config = fluid_mar_config(ref["config"]).model
    null_ids = np.full((config.text_len,), MAR_CLASSES, np.int32)
    null_mask = np.arange(config.text_len) < 1
    model = compose(config, text_vocab_size=config.text_vocab_size,
                    null_text=(null_ids, null_mask), key=jr.key(0))
    batch = ref["batch"]
    ids = np.full((batch, config.text_len), MAR_CLASSES, np.int32)
    ids[:, 0] = np.random.default_rng(0).integers(0, MAR_CLASSES, batch)
    mask = np.broadcast_to(null_mask, ids.shape)
    params, static = eqx.partition(model, eqx.is_array)

    @jax.jit
    def generate(params, ids, mask, key):
        return eqx.combine(params, static).generate_tokens(
            ids, mask, key=key, steps=ref["steps"], cfg=ref["cfg"], cfg_schedule="linear",
            temperature=1.0)

    compiled = generate.lower(params, ids, mask, jr.key(1)).compile()
    tokens = compiled(params, ids, mask, jr.key(1))
    assert tokens.shape == (batch, model.seq_len, 16) and bool(jnp.isfinite(tokens).all())
    return lambda: compiled(params, ids, mask, jr.key(1)).block_until_ready()


def sample(MAR, *, warmup: int, runs: int, with_fluid: bool) -> dict:
    """MAR's `sample_tokens` at issue 6's settings (`sampling.MAR_REFERENCE`, linear
    guidance, temperature 1); with `with_fluid`, alternated call by call with fluid's
    compiled sampler, so that both see the same load."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    ref = MAR_REFERENCE
    batch = ref["batch"]
    torch.manual_seed(0)
    model = MAR(**mar_kwargs(ref["config"]))
    model.eval()
    labels = torch.randint(0, 1000, (batch,))

    def call():
        with torch.no_grad():
            return model.sample_tokens(bsz=batch, num_iter=ref["steps"], cfg=ref["cfg"],
                                       cfg_schedule="linear", labels=labels, temperature=1.0)

    counter = FlopCounterMode(display=False)
    with counter:
        tokens = call()
    assert tokens.shape == (batch, 16, 16, 16) and bool(torch.isfinite(tokens).all())
    calls = {"mar": call}
    if with_fluid:
        calls["fluid_mae"] = fluid_mae_sampler()
        calls["fluid"] = fluid_sampler()
    times = alternate(calls, warmup=warmup, runs=runs)
    sample_s = float(np.median(times["mar"]))
    result = {"config": ref["config"], "batch_size": batch, "order_steps": ref["steps"],
              "cfg": ref["cfg"], "diffusion_steps": 100, "sample_s_median": sample_s,
              "sample_times": times["mar"], "images_per_s": batch / sample_s,
              "issue_sample_s": ref["seconds"],
              "sample_flops_per_image": counter.get_total_flops() / batch}
    if with_fluid:
        fluid_s = float(np.median(times["fluid"]))
        mae_s = float(np.median(times["fluid_mae"]))
        result.update({"fluid_sample_s_median": fluid_s, "fluid_sample_times": times["fluid"],
                       "fluid_speedup_same_session": sample_s / fluid_s,
                       "fluid_speedup_vs_issue_figure": ref["seconds"] / fluid_s,
                       "fluid_mae_sample_s_median": mae_s,
                       "fluid_mae_sample_times": times["fluid_mae"],
                       "fluid_mae_speedup_same_session": sample_s / mae_s})
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mar", required=True, help="a checkout of github.com/LTH14/mar")
    parser.add_argument("--what", nargs="+", default=[*ISSUE_STEP_S, "sample"],
                        choices=[*REFERENCES, "sample"])
    parser.add_argument("--batch", type=int, default=8, help="training batch")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--flop-steps", type=int, default=3)
    parser.add_argument("--with-fluid", action="store_true",
                        help="alternate MAR's train step and sampler with fluid's, call by "
                             "call")
    parser.add_argument("--out", default=str(RESULTS / "mar_reference.json"))
    args = parser.parse_args()
    import torch

    info = conditions()
    info["uptime_start"] = _uptime()
    MAR = load_mar(args.mar)
    out = {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
           "warmup": args.warmup, "runs": args.runs, "runs_by_config": []}
    for what in args.what:
        if what == "sample":
            r = sample(MAR, warmup=args.warmup, runs=args.runs, with_fluid=args.with_fluid)
            print(f"MAR sampling {r['config']}, {r['batch_size']} images: "
                  f"{r['sample_s_median']:.2f} s, "
                  f"{r['sample_flops_per_image'] / 1e9:.0f} GFLOP per image "
                  f"(issue: {r['issue_sample_s']} s)", flush=True)
            if args.with_fluid:
                print(f"fluid sampling (mae backbone), alternated with it: "
                      f"{r['fluid_mae_sample_s_median']:.2f} s "
                      f"({r['fluid_mae_speedup_same_session']:.2f}x MAR's images/s)", flush=True)
                print(f"fluid sampling, alternated with it: {r['fluid_sample_s_median']:.2f} s "
                      f"({r['fluid_speedup_same_session']:.2f}x MAR's images/s in this run, "
                      f"{r['fluid_speedup_vs_issue_figure']:.2f}x the issue's figure)",
                      flush=True)
        else:
            r = train(MAR, what, batch=args.batch, warmup=args.warmup, runs=args.runs,
                      flop_steps=args.flop_steps, with_fluid=args.with_fluid)
            mfu = f", MFU {r['mfu']:.2f}" if "mfu" in r else ""
            print(f"MAR train {what}: {r['step_s_median']:.2f} s/step, "
                  f"{r['train_flops_per_step'] / 1e9:.0f} GFLOP/step, "
                  f"{r['achieved_gflops']:.1f} GFLOP/s{mfu} (issue: {ISSUE_STEP_S.get(what)} s)",
                  flush=True)
            if args.with_fluid:
                f = r["fluid"]
                print(f"fluid train {what} (mae), alternated with it: {f['step_s_median']:.2f} "
                      f"s/step ({f['images_per_s_over_mar']:.2f}x MAR's images/s); "
                      f"{f['xla_dot_flops'] / 1e9:.0f} GFLOP/step of products (XLA), "
                      f"{f['dot_flops_over_mar_at_same_known']:.3f}x MAR's at "
                      f"{f['encoder_slots']} known tokens "
                      f"({r['train_flops_at_fluid_slots'] / 1e9:.0f} GFLOP), "
                      f"{f['dot_flops_over_mar_mean_draw']:.3f}x MAR's mean draw; "
                      f"parameters {f['params']:,} (MAR {r['params']:,})", flush=True)
        out["runs_by_config"].append(r)
    out["conditions"] = finish(info)
    out["conditions"]["uptime_end"] = _uptime()
    print(f"load: {info['uptime_start']} -> {info['uptime_end']}")
    print(write_json(args.out, out))


def _uptime() -> str:
    """`uptime`'s line (the load averages over 1, 5 and 15 minutes), or `os.getloadavg`'s."""
    import os
    import subprocess

    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
