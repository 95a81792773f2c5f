"""Config overrides and checks: overrides apply at once and are checked once (their order does
not matter), a component's new name drops the old class's kwargs, unknown keys point to the
field further down, and values out of range are refused naming the key and the range."""

import dataclasses
import re
import subprocess
import sys
import typing

import pytest

from fluid.config import (
    TRAINABLE_TOKENIZERS,
    ComponentSpec,
    DataConfig,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    override,
)
from fluid.presets import PRESETS, get_config

# The `mlp_flow` head is the example plug-in (`examples/plugin_head`), exposed by conftest.py;
# it takes `width`, `depth` and `sampling_steps`, not the diffusion head's `noise_shift`.
FLOW = "mlp_flow"


# -- order ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        {"data.dataset": "folder", "data.path": "imgs/"},  # the README's command
        {"grad_accum": "3", "batch_size": "9"},
    ],
)
def test_overrides_apply_in_either_order(overrides):
    forward = get_config("tiny-fluid", **overrides)
    backward = get_config("tiny-fluid", **dict(reversed(overrides.items())))
    assert forward == backward
    for dotted, value in overrides.items():
        field = forward
        for part in dotted.split("."):
            field = getattr(field, part)
        assert str(field) == value


def _leaves(config, prefix=""):
    """`{dotted key: value}` of every field of `config`, a spec counting as one value."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, ComponentSpec):
            out.update(_leaves(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_is_the_default_with_its_values_in_any_order(name):
    preset = get_config(name)
    assert preset == PRESETS[name]()
    values = _leaves(preset)
    # Reached one key at a time from the defaults, a tokenizer preset passes through states
    # the config refuses (task="tokenizer" with the default `patch` tokenizer).
    assert apply_overrides(TrainConfig(), values) == preset
    assert apply_overrides(TrainConfig(), dict(reversed(values.items()))) == preset


# -- component specs ------------------------------------------------------------------------
def test_a_new_component_name_drops_the_old_kwargs_and_the_same_name_keeps_them():
    config = get_config("tiny-fluid")
    assert config.model.head.name == "diffusion" and "batch_mul" in config.model.head.kwargs

    switched = get_config("tiny-fluid", **{"model.head.name": FLOW})
    assert switched.model.head == ComponentSpec(name=FLOW, kwargs={})
    assert override(config, "model.head.name", FLOW).model.head == switched.model.head

    same = get_config("tiny-fluid", **{"model.head.name": "diffusion"})
    assert same.model.head == config.model.head

    # A switch on a discrete preset: the softmax head takes no kwargs, the diffusion head's
    # defaults are complete.
    discrete = get_config("tiny-discrete-random", **{"model.head.name": "diffusion"})
    assert discrete.model.head == ComponentSpec(name="diffusion", kwargs={})


@pytest.mark.parametrize(
    "overrides",
    [
        {"model.head.name": FLOW, "model.head.width": "64"},
        {"model.head.width": "64", "model.head.name": FLOW},
        {"model.head.name": FLOW, "model.head.kwargs.width": 64},
        {"model.head": FLOW, "model.head.width": "64"},
        {"model.head.width": "64", "model.head": FLOW},
    ],
)
def test_kwargs_of_the_same_call_apply_on_top_of_a_new_component(overrides):
    config = get_config("tiny-fluid", **overrides)
    assert config.model.head == ComponentSpec(name=FLOW, kwargs={"width": 64})


def test_kwargs_of_the_same_call_apply_on_top_of_the_same_name():
    config = get_config("tiny-fluid", **{"model.head.width": "64", "model.head.name": "diffusion"})
    kwargs = get_config("tiny-fluid").model.head.kwargs
    assert config.model.head == ComponentSpec(name="diffusion", kwargs={**kwargs, "width": 64})


def test_kwargs_of_a_new_name_are_still_checked_against_its_class():
    # The error is about the kwarg given, not about one the old head carried over.
    with pytest.raises(TypeError, match=f"head '{FLOW}' takes no argument 'noise_shift'"):
        get_config("tiny-fluid", **{"model.head.noise_shift": "4", "model.head.name": FLOW})


# -- unknown keys ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, suggestion",
    [
        ("head.name", "'model.head.name'"),
        ("learning_rate", "'optim.learning_rate'"),
        ("image_size", "'model.tokenizer.image_size' or 'data.image_size'"),
        ("learning_rat", "'optim.learning_rate'"),
        ("depth", "'model.head.depth', 'model.backbone.depth' or 'model.text_encoder.depth'"),
    ],
)
def test_an_unknown_key_names_the_field_further_down(key, suggestion):
    with pytest.raises(KeyError, match=re.escape(f"Did you mean {suggestion}?")):
        get_config("tiny-fluid", **{key: "1"})


def test_a_typo_still_names_the_closest_key_at_its_level():
    with pytest.raises(KeyError, match="Did you mean 'grad_accum'"):
        get_config("tiny-fluid", grad_acum="2")
    with pytest.raises(KeyError, match="Did you mean 'learning_rate'"):
        get_config("tiny-fluid", **{"optim.learning_rat": "1"})
    with pytest.raises(KeyError, match="no fields; cannot set 'steps.x'"):
        get_config("tiny-fluid", **{"steps.x": "1"})


# -- values ---------------------------------------------------------------------------------
REFUSED = [
    ("steps", "0", "steps must be >= 1, got 0"),
    ("batch_size", "0", "batch_size must be >= 1, got 0"),
    ("log_every", "0", "log_every must be >= 1, got 0"),
    ("checkpoint_every", "-1", "checkpoint_every must be >= 0, got -1"),
    ("keep_checkpoints", "0", "keep_checkpoints must be >= 1, got 0"),
    ("sample_every", "-1", "sample_every must be >= 0, got -1"),
    ("sample_steps", "0", "sample_steps must be >= 1, got 0"),
    ("sample_cfg", "-1", "sample_cfg must be >= 0, got -1.0"),
    ("sample_temperature", "-0.5", "sample_temperature must be >= 0, got -0.5"),
    ("seed", "-1", "seed must be >= 0, got -1"),
    ("optim.learning_rate", "-1", "optim.learning_rate must be > 0, got -1.0"),
    ("optim.learning_rate", "0", "optim.learning_rate must be > 0, got 0.0"),
    ("optim.learning_rate", "inf", "optim.learning_rate must be finite, got inf"),
    ("optim.learning_rate", "nan", "optim.learning_rate must be finite, got nan"),
    ("optim.warmup_steps", "-1", "optim.warmup_steps must be >= 0, got -1"),
    ("optim.b1", "1", "optim.b1 must lie in [0, 1), got 1.0"),
    ("optim.b2", "-0.1", "optim.b2 must lie in [0, 1), got -0.1"),
    ("optim.weight_decay", "-0.01", "optim.weight_decay must be >= 0, got -0.01"),
    ("optim.grad_clip", "0", "optim.grad_clip must be > 0, got 0.0"),
    ("optim.ema_decay", "1", "optim.ema_decay must lie in [0, 1), got 1.0"),
    ("model.width", "0", "model.width must be >= 1, got 0"),
    ("model.text_len", "1", "model.text_len must be >= 2, got 1"),
    ("model.text_vocab_size", "4", "model.text_vocab_size must be >= 5, got 4"),
    ("model.aligner_depth", "-1", "model.aligner_depth must be >= 0, got -1"),
    ("data.image_size", "0", "data.image_size must be >= 1, got 0"),
    ("data.object_scale", "0", "data.object_scale must be > 0, got 0.0"),
    ("data.fit_images", "0", "data.fit_images must be >= 1, got 0"),
    ("data.on_change", "ignore", "data.on_change must be one of ('error', 'restart'), got 'ignore'"),
    ("data.style", "glossy", "unknown data.style 'glossy'; choose one of ('flat', 'shaded')"),
    ("mesh.data", "0", "mesh.data must be -1 (the remaining devices) or >= 1, got 0"),
    ("mesh.model", "-2", "mesh.model must be -1 (the remaining devices) or >= 1, got -2"),
    ("mesh.min_shard_size", "-1", "mesh.min_shard_size must be >= 0, got -1"),
]


@pytest.mark.parametrize("key, value, message", REFUSED, ids=[f"{k}={v}" for k, v, _ in REFUSED])
def test_a_value_out_of_range_is_refused_naming_its_key_and_range(key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        get_config("tiny-fluid", **{key: value})


def test_values_are_checked_when_built_not_only_from_the_command_line():
    # Under the tests' import hook beartype refuses it first; without it, the config does.
    with pytest.raises(TypeError, match="steps"):
        get_config("tiny-fluid", steps=2.5)
    with pytest.raises(ValueError, match="at most one of mesh.data and mesh.model may be -1"):
        get_config("tiny-fluid", **{"mesh.model": "-1"})
    with pytest.raises(ValueError, match=re.escape("data.on_change must be one of")):
        DataConfig(on_change="continue")


def test_the_edges_of_each_range_are_accepted():
    edges = {
        "optim.ema_decay": "0",  # no averaging
        "optim.b1": "0",
        "optim.warmup_steps": "0",
        "optim.weight_decay": "0",
        "optim.grad_clip": "none",
        "sample_cfg": "0",  # unconditional
        "sample_temperature": "0",  # the most likely token / no injected noise
        "checkpoint_every": "0",
        "sample_every": "0",
        "log_every": "1",
        "model.aligner_depth": "0",
        "model.text_len": "2",
        "model.text_vocab_size": "5",
        "mesh.data": "1",
        "mesh.model": "-1",
        "mesh.min_shard_size": "0",
        "data.on_change": "restart",
    }
    config = get_config("tiny-fluid", **edges)
    assert config.data.on_change == "restart" and config.optim.grad_clip is None
    assert config.optim.ema_decay == 0.0 and config.sample_temperature == 0.0
    assert DataConfig().on_change == "error"



# -- plain data -----------------------------------------------------------------------------
def test_importing_the_config_imports_no_component_and_no_jax():
    code = (
        "import sys\n"
        "import fluid.config as c\n"
        "c.DataConfig(); c.OptimConfig(); c.MeshConfig(); c.TokenizerLossConfig()\n"
        "print(sorted(m for m in sys.modules if m.startswith('fluid') or m == 'jax'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert eval(out) == ["fluid", "fluid._errors", "fluid._overrides", "fluid._registry",
                         "fluid.config"]


def test_the_model_config_holds_one_spec_per_slot():
    from fluid import SLOTS

    hints = typing.get_type_hints(ModelConfig)
    specs = [f.name for f in dataclasses.fields(ModelConfig) if hints[f.name] is ComponentSpec]
    assert specs == list(SLOTS)


def test_the_trainable_tokenizers_are_those_the_autoencoder_objective_trains():
    from fluid import TOKENIZERS
    from fluid.tokenizers import AutoencoderObjective

    trained = typing.get_args(typing.get_type_hints(AutoencoderObjective)["autoencoder"])
    assert trained and {
        name for name in TOKENIZERS.names() if TOKENIZERS.get(name) in trained
    } == set(TRAINABLE_TOKENIZERS)
