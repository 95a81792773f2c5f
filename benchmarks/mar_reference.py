"""MAR's own PyTorch code timed on this machine: the reference issue 6 measures fluid against.

    git clone https://github.com/LTH14/mar /tmp/mar
    pip install --no-deps timm==0.9.12
    python benchmarks/mar_reference.py --mar /tmp/mar                 # train mar512, mar256; sampling
    python benchmarks/mar_reference.py --mar /tmp/mar --what sample --runs 5 --with-fluid

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

`results/mar_reference.json`: per configuration `step_s_median`, `step_times`,
`train_flops_per_step`, `achieved_gflops`, `mfu`; for sampling `sample_s_median`,
`sample_times`, `images_per_s`, `sample_flops_per_image` (one call counted), and with
`--with-fluid` (fluid's compiled `mar256` sampler alternated call by call with MAR's)
`fluid_sample_s_median`, `fluid_speedup_same_session`, `fluid_speedup_vs_issue_figure`;
`torch_threads`, `conditions`.
"""

import argparse
import importlib.abc
import importlib.machinery
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REFERENCES,
    RESULTS,
    conditions,
    finish,
    median_time,
    model_config,
    read_peak,
    write_json,
)
from sampling import MAR_REFERENCE, captions, generate_fn
from sampling import build as build_fluid

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


def train(MAR, name: str, *, batch: int, warmup: int, runs: int, flop_steps: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
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

    flops = []
    for _ in range(flop_steps):
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops.append(counter.get_total_flops())
    step_s, times = median_time(step, warmup=warmup, runs=runs)
    result = {"config": name, "batch_size": batch, "step_s_median": step_s, "step_times": times,
              "images_per_s": batch / step_s, "train_flops_per_step": float(np.mean(flops)),
              "train_flops_draws": flops, "issue_step_s": ISSUE_STEP_S.get(name)}
    result["achieved_gflops"] = result["train_flops_per_step"] / step_s / 1e9
    peak = read_peak()
    if peak:
        result["peak_gflops_float32"] = peak["peak"]["float32"]["gflops"]
        result["mfu"] = result["achieved_gflops"] / result["peak_gflops_float32"]
    return result


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
        calls["fluid"] = fluid_sampler()
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times = {name: [] for name in calls}
    for i in range(runs):
        for name in (list(calls) if i % 2 == 0 else list(calls)[::-1]):
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    sample_s = float(np.median(times["mar"]))
    result = {"config": ref["config"], "batch_size": batch, "order_steps": ref["steps"],
              "cfg": ref["cfg"], "diffusion_steps": 100, "sample_s_median": sample_s,
              "sample_times": times["mar"], "images_per_s": batch / sample_s,
              "issue_sample_s": ref["seconds"],
              "sample_flops_per_image": counter.get_total_flops() / batch}
    if with_fluid:
        fluid_s = float(np.median(times["fluid"]))
        result.update({"fluid_sample_s_median": fluid_s, "fluid_sample_times": times["fluid"],
                       "fluid_speedup_same_session": sample_s / fluid_s,
                       "fluid_speedup_vs_issue_figure": ref["seconds"] / fluid_s})
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
                        help="alternate MAR's sampler with fluid's, call by call")
    parser.add_argument("--out", default=str(RESULTS / "mar_reference.json"))
    args = parser.parse_args()
    import torch

    info = conditions()
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
                print(f"fluid sampling, alternated with it: {r['fluid_sample_s_median']:.2f} s "
                      f"({r['fluid_speedup_same_session']:.2f}x MAR's images/s in this run, "
                      f"{r['fluid_speedup_vs_issue_figure']:.2f}x the issue's figure)",
                      flush=True)
        else:
            r = train(MAR, what, batch=args.batch, warmup=args.warmup, runs=args.runs,
                      flop_steps=args.flop_steps)
            mfu = f", MFU {r['mfu']:.2f}" if "mfu" in r else ""
            print(f"MAR train {what}: {r['step_s_median']:.2f} s/step, "
                  f"{r['train_flops_per_step'] / 1e9:.0f} GFLOP/step, "
                  f"{r['achieved_gflops']:.1f} GFLOP/s{mfu} (issue: {ISSUE_STEP_S.get(what)} s)",
                  flush=True)
        out["runs_by_config"].append(r)
    out["conditions"] = finish(info)
    print(write_json(args.out, out))


if __name__ == "__main__":
    main()
