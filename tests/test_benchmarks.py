"""The benchmarks' own instruments: the analytic FLOP counter against XLA's accounting, the
head-evaluation counter against its expected count, and the profiler's attribution of
operations to model parts. (Speed is never asserted here.)"""

import dataclasses
import re
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import replace_fields
from _profile import PARTS, classify_instructions, part_of
from flops import bidirectional_pass_flops, hlo_dot_flops, token_grid, train_flops
from mfu import unrolled_scans
from sampling import build, captions, counting_model, generate_fn

from fluid.build import abstract_model
from fluid.config import ComponentSpec, ModelConfig
from fluid.heads import DiffusionHead
from fluid.nn import TransformerStack

# XLA's flops of a training step over the analytic matmul FLOPs (3x-forward convention), for
# the model of `test_analytic_flops_match_xla` (width 128): XLA also counts every elementwise
# operation (normalisations, activations, softmax, the diffusion loss, random bits, with
# transcendental functions expanded into polynomials), and it leaves out the input gradients
# of products whose input is data. Measured 1.04 with jax 0.10.2; 1.02 at MAR's sizes
# (benchmarks/results/mfu.json), 1.6 at width 32, where elementwise work weighs more.
XLA_OVER_ANALYTIC = (1.0, 1.3)
# The modules that scan stacked layers under `jax.checkpoint` (their `remat`).
SCANNED = (TransformerStack, DiffusionHead)


def tiny_model(variant: str, text_depth: int = 0) -> ModelConfig:
    """A very small model of `variant`: 4 tokens, width 16, a 5-step diffusion head, and
    `text_depth` blocks in the text encoder and in the aligner."""
    random = variant == "fluid"
    return ModelConfig(
        tokenizer=ComponentSpec(name="patch", kwargs={"image_size": 8, "patch_size": 4}),
        head=ComponentSpec(name="diffusion", kwargs={"width": 16, "depth": 1, "batch_mul": 2,
                                                     "sampling_steps": 5}),
        order=ComponentSpec(name="random" if random else "raster"),
        backbone=ComponentSpec(name="bidirectional" if random else "causal",
                               kwargs={"depth": 1, "num_heads": 2}),
        text_encoder=ComponentSpec(name="learned", kwargs={"dim": 16, "depth": text_depth,
                                                           "num_heads": 2}),
        width=16, aligner_depth=text_depth, aligner_heads=2, text_len=4, text_vocab_size=16,
    )


def test_analytic_flops_match_xla():
    # Wide enough that matmuls dominate, one block of each kind: small programs compile fast.
    config = dataclasses.replace(
        tiny_model("fluid", text_depth=1),
        tokenizer=ComponentSpec(name="patch", kwargs={"image_size": 16, "patch_size": 4}),
        head=ComponentSpec(name="diffusion", kwargs={"width": 128, "depth": 1, "batch_mul": 2}),
        width=128,
    )
    batch = 4
    seq, token_dim, _ = token_grid(config)
    ids, mask = captions(config, batch)
    data = {"tokens": np.random.default_rng(0).standard_normal((batch, seq, token_dim),
                                                               np.float32),
            "text_ids": ids, "text_mask": mask}
    # Only shapes are needed: the structure alone, no weights (the patch tokenizer has none,
    # so every floating-point leaf trains).
    structure = abstract_model(config)
    # Model FLOPs: without rematerialisation, whose recomputed attention products XLA
    # would count too.
    structure = replace_fields(structure, SCANNED, remat=None)
    scanned = [x for x in jax.tree.leaves(structure, is_leaf=lambda x: isinstance(x, SCANNED))
               if isinstance(x, SCANNED)]
    assert len(scanned) == 4 and all(x.remat is None for x in scanned)  # text, aligner, ...
    params, rest = eqx.partition(
        structure, lambda x: isinstance(x, jax.ShapeDtypeStruct) and x.dtype == jnp.float32
    )

    @jax.jit
    def grads(params, rest, data, key):
        return jax.grad(lambda p: eqx.combine(p, rest).loss(data, key=key))(params)

    with unrolled_scans():
        compiled = grads.lower(params, rest, data, jr.key(0)).compile()
    cost = compiled.cost_analysis()
    xla = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    dots, n_dots = hlo_dot_flops(compiled.as_text())
    analytic = train_flops(config, batch=batch, seq_len=seq, token_dim=token_dim)
    assert n_dots > 0
    # XLA's dots are exactly the products counted, less the unneeded input gradients.
    assert dots == pytest.approx(analytic["train_total_exact"], rel=0.01)
    assert XLA_OVER_ANALYTIC[0] <= xla / analytic["train_total"] <= XLA_OVER_ANALYTIC[1]


@pytest.mark.parametrize("rows", [None, 1, 3])
def test_bidirectional_pass_flops_match_xla(rows):
    # `sample_flops` counts the random order's backbone as `at_positions` passes: XLA's dots
    # of one pass (a full pass when `rows` is None) are exactly the counted products.
    base = tiny_model("fluid")
    config = dataclasses.replace(
        base, backbone=dataclasses.replace(base.backbone, kwargs={"depth": 2, "num_heads": 2})
    )
    seq = token_grid(config)[0]
    backbone = abstract_model(config).backbone
    x = jax.ShapeDtypeStruct((seq, config.width), jnp.float32)
    known = jax.ShapeDtypeStruct((seq,), jnp.bool_)
    ctx = jax.ShapeDtypeStruct((config.text_len, config.width), jnp.float32)
    ctx_mask = jax.ShapeDtypeStruct((config.text_len,), jnp.bool_)

    def one_pass(b, *args):
        return b(*args) if rows is None else b.at_positions(*args, jnp.arange(rows))

    with unrolled_scans():
        compiled = jax.jit(one_pass).lower(backbone, x, known, ctx, ctx_mask).compile()
    dots, _ = hlo_dot_flops(compiled.as_text())
    assert dots == bidirectional_pass_flops(config, seq_len=seq, rows=rows)


@pytest.mark.parametrize("variant, cfg", [("fluid", 3.0), ("continuous-raster", 1.0)])
def test_head_evaluations_counted(variant, cfg):
    config = tiny_model(variant)
    model = build(config)
    counting, counter = counting_model(model)
    batch, seq = 2, model.seq_len
    ids, mask = captions(config, batch)
    generate, params = generate_fn(counting, steps=2, cfg=cfg)
    images = generate(params, ids, mask, jr.key(0))
    assert images.shape == (batch, 8, 8, 3)
    expected = seq * model.head.num_evaluations() * (2 if cfg != 1.0 else 1)
    assert expected == seq * 5 * (2 if cfg != 1.0 else 1)
    assert counter.rows == batch * expected


def test_part_of_reads_whole_name_segments():
    assert part_of("jit(step)/vmap()/head/vmap()/dot_general") == "head"
    assert part_of("jit(step)/transpose(jvp(backbone))/checkpoint/dot_general") == "backbone"
    assert part_of("jit(generate)/while/body/text/dot_general") == "text"
    # A segment that merely contains a part's name is not that part.
    assert part_of("jit(step)/vmap(heads_first)/dot_general") == "other"
    assert part_of("jit(step)/optax/add") == "other"


def _loss_and_sampler(variant: str):
    """The tiny model's loss gradient and its sampler (guided), lowered."""
    config = tiny_model(variant, text_depth=1)
    model = build(config)
    batch = 2
    ids, mask = captions(config, batch)
    tokens = jr.normal(jr.key(1), (batch, model.seq_len, 48))
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(params):
        m = eqx.combine(params, static)
        return m.loss({"tokens": tokens, "text_ids": ids, "text_mask": mask}, key=jr.key(2))

    generate, gen_params = generate_fn(model, steps=2, cfg=3.0)
    return {
        "loss gradient": jax.jit(jax.grad(loss)).lower(params),
        "sampling": generate.lower(gen_params, ids, mask, jr.key(0)),
    }


@pytest.fixture
def no_persistent_cache():
    """Compile without the tests' persistent compilation cache, which keys programs
    without their operation names: a cached program can carry the names of an older
    version of the code."""
    from jax._src import compilation_cache

    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_enable_compilation_cache", previous)
    compilation_cache.reset_cache()


@pytest.mark.parametrize("variant", ["fluid", "continuous-raster"])
def test_every_product_is_attributed_to_a_part(variant, no_persistent_cache):
    # `FluidModel` names its components' scopes, so that a profile says which part each
    # product belongs to: in the optimised loss gradient and sampler, every dot that
    # carries an operation name comes from a named part, and the backbone, the head and
    # the text side each own some.
    for what, lowered in _loss_and_sampler(variant).items():
        hlo = lowered.compile().as_text()
        dot_parts = [part_of(op) for kind, op in classify_instructions(hlo).values()
                     if kind == "dot" and op]
        assert dot_parts, what
        assert set(dot_parts) <= set(PARTS), (what, sorted(set(dot_parts)))
        assert {"backbone", "head", "text"} <= set(dot_parts), (what, sorted(set(dot_parts)))


def test_classify_instructions_finds_the_products_of_an_optimised_program():
    # The instructions `classify_instructions` calls products are those whose own line or
    # called computations (transitively) hold a dot, found here by splitting the module at
    # its blank lines instead of parsing computation headers (whose tuple types carry
    # `/*index=5*/` comments with an `=` in them).
    hlo = _loss_and_sampler("fluid")["loss gradient"].compile().as_text()
    blocks = {}
    for block in hlo.split("\n\n"):
        lines = [line for line in block.strip().splitlines() if line.strip()]
        if lines and lines[-1].strip() == "}":
            name = lines[0].removeprefix("ENTRY ").split()[0].lstrip("%")
            blocks[name] = "\n".join(lines[1:])
    calls = re.compile(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)")

    def holds_dot(text, seen=()):
        return " dot(" in text or any(
            c not in seen and holds_dot(blocks.get(c, ""), (*seen, c)) for c in calls.findall(text)
        )

    expected, found = set(), set()
    for body in blocks.values():
        for line in body.splitlines():
            m = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*\S+\s+([\w\-]+)\(", line)
            if m and m.group(2) not in ("while", "call", "conditional") and holds_dot(line):
                expected.add(m.group(1))
    found = {n for n, (kind, _) in classify_instructions(hlo).items() if kind == "dot"}
    assert len(blocks) > 20 and len(expected) > 10
    assert found == expected


def test_mar_reference_stands_in_for_torchvision_as_timm_uses_it(tmp_path):
    # In a fresh interpreter: the stand-in is a global import hook.
    import subprocess

    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    script = (
        f"import sys; sys.path.insert(0, {benchmarks!r})\n"
        "import mar_reference; mar_reference._stand_in_torchvision()\n"
        "from torchvision.transforms import InterpolationMode as I\n"
        "from torchvision.ops.misc import FrozenBatchNorm2d\n"
        "import torchvision.transforms.functional as F\n"
        "table = {I.NEAREST: 'nearest', I.BILINEAR: 'bilinear', I.BICUBIC: 'bicubic'}\n"
        "assert len(table) == 3 and table[I.BILINEAR] == 'bilinear', table\n"
        "assert I.NEAREST is I.NEAREST\n"
        "class Frozen(FrozenBatchNorm2d): pass\n"
        "Frozen(3, eps=1e-5); F.resize\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.parametrize("name, width, blocks, heads", [("mar512", 512, 4, 8),
                                                        ("mar256", 256, 2, 4)])
def test_mar_reference_builds_mar_at_the_issues_sizes(name, width, blocks, heads):
    # Issue 6's MAR configurations: encoder and decoder of `blocks` each at `width`, a
    # 3 x width diffusion head, batch multiplier 4, 256 tokens of 16 channels.
    from mar_reference import mar_kwargs

    assert mar_kwargs(name) == {
        "img_size": 256, "vae_stride": 16, "patch_size": 1, "vae_embed_dim": 16,
        "buffer_size": 64, "encoder_embed_dim": width, "encoder_depth": blocks,
        "encoder_num_heads": heads, "decoder_embed_dim": width, "decoder_depth": blocks,
        "decoder_num_heads": heads, "diffloss_d": 3, "diffloss_w": width,
        "num_sampling_steps": "100", "diffusion_batch_mul": 4,
    }


def _mar_param_count(k: dict, *, classes: int = 1000) -> int:
    """MAR's trainable parameters (LTH14/mar, `models/mar.py` and `models/diffloss.py`),
    layer by layer from its constructor arguments `k`."""
    w, W, d, c = k["encoder_embed_dim"], k["diffloss_w"], k["diffloss_d"], k["vae_embed_dim"]
    n = (k["img_size"] // k["vae_stride"]) ** 2
    total = n + k["buffer_size"]
    block = 12 * w * w + 13 * w  # timm Block: 2 LayerNorms, qkv (bias), proj, MLP 4x
    mar = (c * w + w  # z_proj
           + classes * w + w  # class_emb, fake_latent
           + total * w + 2 * w  # encoder_pos_embed_learned, z_proj_ln
           + k["encoder_depth"] * block + 2 * w  # encoder blocks, encoder_norm
           + w * w + w + w + total * w  # decoder_embed, mask_token, decoder_pos_embed
           + k["decoder_depth"] * block + 2 * w  # decoder blocks, decoder_norm
           + n * w)  # diffusion_pos_embed_learned
    head = (256 * W + W + W * W + W  # time_embed (256 frequencies)
            + w * W + W + c * W + W  # cond_embed, input_proj
            + d * (2 * W + 2 * (W * W + W) + 3 * W * W + 3 * W)  # ResBlocks
            + W * 2 * c + 2 * c + 2 * W * W + 2 * W)  # FinalLayer (learned sigma: 2c out)
    return mar + head


@pytest.mark.parametrize("name, count", [("mar512", None), ("mar256", 5_046_560)])
def test_mar_reference_times_fluid_at_mars_sizes(name, count):
    # The fluid model `mar_reference.py --with-fluid` trains beside MAR has MAR's parameters
    # (the tokenizer apart: tokens are fed directly), counted layer by layer from MAR's
    # code; 5,046,560 is what torch counted for MAR's own `mar256` model. Its encoder has
    # the slots MAR's least-masked draw needs (256 - ceil(0.7 * 256) known tokens).
    from mar_reference import fluid_mar_config, mar_kwargs

    from fluid.build import count_params

    config = fluid_mar_config(name)
    model = abstract_model(config.model)
    parts = (model.token_embedding, model.text_encoder, model.aligner, model.backbone,
             model.head)
    expected = _mar_param_count(mar_kwargs(name))
    assert count is None or expected == count
    assert sum(count_params(p) for p in parts) == expected
    assert model.seq_len == 256 and model.tokenizer.token_dim == 16
    assert model.order.max_num_known(256) == 76
    optim = config.optim
    assert (config.batch_size, config.precision, optim.b1, optim.b2, optim.weight_decay,
            optim.grad_clip, optim.ema_decay) == (8, "float32", 0.9, 0.95, 0.02, 3.0, 0.9999)


def test_ab_imports_a_revision_beside_fluid_and_tells_what_differs(tmp_path):
    # `benchmarks/ab.py`: the other version is a second, independent package in this process.
    import ab

    import fluid

    before = ab.import_revision("HEAD", tmp_path)
    assert before.__name__ == "fluid_before" and before is not fluid
    model_module = __import__("fluid_before.model", fromlist=["FluidModel"])
    assert model_module.FluidModel is not fluid.model.FluidModel
    assert model_module.FluidModel.__name__ == "FluidModel"
    a = {"w": np.zeros(3), "b": np.ones(2), "gone": np.zeros(1)}
    b = {"w": np.zeros(3), "b": np.array([1.0, 2.0]), "new": np.zeros(1)}
    assert ab.differences(a, b) == ["['gone'] only before", "['new'] only after",
                                    "['b'] differs"]
    assert ab.differences(a, a) == []


def test_quality_speed_measures_the_baseline_and_each_switch(tmp_path):
    # An untrained tiny model, 2 seeds of 6 images: the structure of the output, and that the
    # baseline's images are `generate_images`' with every switch off for the same seed.
    import json

    from quality_speed import main

    from fluid.eval import generate_images
    from fluid.run import load_model

    out = main(["--train", "tiny-fluid", "--steps", "0", "--train-out", str(tmp_path / "run"),
                "--seeds", "2", "--samples", "6", "--min-count", "2", "--only", "cfg-refresh-2",
                "--out-dir", str(tmp_path), "--name", "t"], keep_images=True)
    written = json.loads((tmp_path / "quality_speed_t.json").read_text())
    assert (tmp_path / "quality_speed_t.png").stat().st_size > 0
    assert "images" not in written and written["best"] == out["best"]
    assert [r["name"] for r in written["settings"]] == ["baseline", "cfg-refresh-2"]
    assert written["settings"][1]["switches"]["cfg_refresh"] == 2
    assert written["frechet"]["rough"] and written["frechet"]["min_count"] == 2
    # Only the refresh family has a setting: no combination, and it says why.
    assert written["combination"] is None
    assert [s["name"] for s in written["skipped"]] == ["combination"]
    for row in written["settings"]:
        assert row["images_per_s"] > 0 and len(row["seconds"]) == 2
        for x in [row["frechet"], row["shapes_eval"]["overall"],
                  *row["shapes_eval"]["categories"].values()]:
            assert len(x["per_seed"]) == 2
            assert x["low"] <= x["mean"] <= x["high"]
            assert x["mean"] == pytest.approx(np.mean(x["per_seed"]))
        assert set(row["shapes_eval"]["categories"]) == set(written["categories"])
    assert written["settings"][0]["keeps_quality"] and written["settings"][0]["speedup"] == 1

    model, tok, config = load_model(tmp_path / "run")
    from fluid.eval import ShapesEval

    for seed in range(2):
        prompts = ShapesEval().prompts(1, seed=seed, categories=written["categories"])
        expected = generate_images(model, tok, prompts, text_len=config.model.text_len,
                                   seed=seed, steps=config.sample_steps, cfg=config.sample_cfg,
                                   temperature=config.sample_temperature, progress=False)
        np.testing.assert_array_equal(out["images"]["baseline"][seed], expected)


def test_quality_speed_skips_what_a_model_cannot_take_and_combines_the_fastest_kept():
    from quality_speed import (
        candidate_settings,
        combination_of,
        combine,
        keeps_quality,
        refusal,
        within_baseline,
    )

    from fluid.presets import get_config

    config = get_config("tiny-continuous-raster")  # a causal backbone, a diffusion head
    model = abstract_model(config.model)
    settings = {s.name: s for s in candidate_settings(model)}
    assert set(settings) >= {"baseline", "head-steps-50", "head-steps-25", "ddim-25", "disa",
                             "cfg-interval-0-0.5", "cfg-refresh-2", "cfg-refresh-4"}
    assert settings["disa"].head_steps == (50, 35, 20, 5)
    assert "bidirectional" in refusal(model, config, settings["cfg-refresh-4"])
    assert refusal(model, config, settings["cfg-interval-0-0.5"]) is None
    assert refusal(model, config, settings["ddim-25"]) is None
    unguided = dataclasses.replace(config, sample_cfg=1.0)
    assert "without guidance" in refusal(model, unguided, settings["cfg-interval-0-0.5"])

    def row(name, family, speed, kept):
        return {"name": name, "family": family, "images_per_s": speed, "keeps_quality": kept}

    rows = [row("baseline", None, 1.0, True), row("head-steps-25", "head", 3.0, False),
            row("head-steps-50", "head", 2.0, True), row("disa", "head", 2.5, True),
            row("cfg-interval-0-0.5", "cfg_interval", 1.5, False),
            row("cfg-refresh-2", "cfg_refresh", 1.2, True)]
    assert combination_of(rows) == ["disa", "cfg-refresh-2"]
    # The rule is one-sided: better than the baseline keeps quality, worse does not.
    def judged(se, fd):
        return {"shapes_eval": {"overall": {"low": se[0], "high": se[1]}},
                "frechet": {"low": fd[0], "high": fd[1]}}

    base = judged((0.4, 0.5), (7.0, 8.0))
    assert keeps_quality(judged((0.6, 0.7), (5.0, 6.0)), base)  # better on both
    assert not within_baseline(judged((0.6, 0.7), (5.0, 6.0)), base)
    assert keeps_quality(judged((0.35, 0.45), (7.5, 8.5)), base)  # overlapping
    assert not keeps_quality(judged((0.2, 0.3), (7.0, 8.0)), base)  # worse ShapesEval
    assert not keeps_quality(judged((0.4, 0.5), (8.1, 9.0)), base)  # worse Frechet
    combo = combine("c", [settings["ddim-25"], settings["cfg-refresh-2"]])
    assert (combo.head_steps, combo.head_sampler, combo.cfg_refresh) == (25, ("ddim", 0.0), 2)
