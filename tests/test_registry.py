"""The registry: entry-point discovery through fake distributions, lazy loading, errors."""

import os
import subprocess
import sys
import textwrap

import pytest
from _plugins import make_distribution

import fluid
from fluid import (
    BACKBONES,
    CAPTION_TOKENIZERS,
    HEADS,
    ORDERS,
    SLOTS,
    TEXT_ENCODERS,
    TOKENIZERS,
    AbstractOutputHead,
    ComponentSpec,
    DuplicateComponentError,
    InvalidComponentError,
    Registry,
    UnknownComponentError,
)
from fluid._registry import BUILTIN_SOURCE
from fluid.heads import DiffusionHead, FlowHead, SoftmaxHead

HEAD_SOURCE = textwrap.dedent(
    """
    import typing
    import jax.numpy as jnp
    from fluid import CONTINUOUS, AbstractOutputHead

    LOADED = True

    @typing.final
    class {cls}(AbstractOutputHead):
        token_kind: typing.ClassVar[str] = CONTINUOUS
        cond_dim: int = 4

        def loss(self, z, target, *, key):
            return jnp.sum(z) * 0.0

        def sample(self, z, z_uncond, cfg, temperature, *, key):
            return jnp.zeros((3,))

        def num_evaluations(self):
            return 1
    """
)


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A fresh head registry over group `fluid_test.heads`, with two fake plug-ins."""
    make_distribution(
        tmp_path / "a",
        "plugin-a",
        {"fluid_test.heads": {"alpha": "plugin_a_mod:AlphaHead"}},
        {"plugin_a_mod": HEAD_SOURCE.format(cls="AlphaHead")},
    )
    make_distribution(
        tmp_path / "b",
        "plugin-b",
        {"fluid_test.heads": {"beta": "plugin_b_mod:BetaHead"}},
        {"plugin_b_mod": HEAD_SOURCE.format(cls="BetaHead")},
    )
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    monkeypatch.syspath_prepend(str(tmp_path / "b"))
    for mod in ("plugin_a_mod", "plugin_b_mod"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    reg = Registry("output head", AbstractOutputHead, "fluid_test.heads")
    reg.register("softmax", SoftmaxHead)
    return reg


def test_entry_points_are_discovered_with_their_source(registry):
    entries = {e.name: e for e in registry.entries()}
    assert sorted(entries) == ["alpha", "beta", "softmax"]
    assert entries["alpha"].source == "plugin-a"
    assert entries["beta"].target == "plugin_b_mod:BetaHead"
    assert entries["softmax"].source == BUILTIN_SOURCE


def test_listing_imports_no_plugin_and_get_loads_only_one(registry):
    assert "alpha" in registry.names()
    assert "plugin_a_mod" not in sys.modules
    cls = registry.get("alpha")
    assert cls.__name__ == "AlphaHead" and issubclass(cls, AbstractOutputHead)
    assert "plugin_a_mod" in sys.modules
    assert "plugin_b_mod" not in sys.modules
    assert registry.get("alpha") is cls  # cached


def test_unknown_name_lists_known_names(registry):
    with pytest.raises(UnknownComponentError) as info:
        registry.get("alhpa")
    message = str(info.value)
    assert "'alhpa'" in message and "alpha, beta, softmax" in message
    assert "Did you mean 'alpha'" in message
    assert "fluid_test.heads" in message


def test_plugin_claiming_a_builtin_name_is_an_error_naming_both(tmp_path, registry, monkeypatch):
    make_distribution(
        tmp_path / "c",
        "plugin-c",
        {"fluid_test.heads": {"softmax": "plugin_c_mod:Nope"}},
    )
    monkeypatch.syspath_prepend(str(tmp_path / "c"))
    registry.refresh()
    with pytest.raises(DuplicateComponentError) as info:
        registry.get("softmax")
    assert BUILTIN_SOURCE in str(info.value) and "plugin-c" in str(info.value)
    with pytest.raises(DuplicateComponentError):
        registry.names()
    # other names still resolve
    assert registry.get("beta").__name__ == "BetaHead"


def test_two_plugins_with_one_name_is_an_error_naming_both(tmp_path, registry, monkeypatch):
    make_distribution(
        tmp_path / "d",
        "plugin-d",
        {"fluid_test.heads": {"alpha": "plugin_d_mod:Other"}},
    )
    monkeypatch.syspath_prepend(str(tmp_path / "d"))
    registry.refresh()
    with pytest.raises(DuplicateComponentError) as info:
        registry.get("alpha")
    assert "plugin-a" in str(info.value) and "plugin-d" in str(info.value)


def test_builtin_registered_twice_is_an_error(registry):
    with pytest.raises(DuplicateComponentError, match="registered twice"):
        registry.register("softmax", DiffusionHead)
    registry.register("softmax", SoftmaxHead)  # the same class again is harmless


def test_abstract_or_wrong_base_is_refused(registry, tmp_path, monkeypatch):
    with pytest.raises(InvalidComponentError, match="abstract"):
        registry.register("abstract", AbstractOutputHead)
    with pytest.raises(InvalidComponentError, match="does not subclass"):
        registry.register("dict", dict)
    make_distribution(
        tmp_path / "e",
        "plugin-e",
        {"fluid_test.heads": {"wrong": "plugin_e_mod:NotAHead"}},
        {"plugin_e_mod": "class NotAHead:\n    pass\n"},
    )
    monkeypatch.syspath_prepend(str(tmp_path / "e"))
    monkeypatch.delitem(sys.modules, "plugin_e_mod", raising=False)
    registry.refresh()
    with pytest.raises(InvalidComponentError, match="plugin-e"):
        registry.get("wrong")


def test_build_checks_kwargs_against_the_signature():
    import jax.random as jr

    with pytest.raises(TypeError, match="Did you mean 'vocab_size'"):
        HEADS.build("softmax", key=jr.key(0), cond_dim=4, vocab_sise=3)
    head = HEADS.build("softmax", key=jr.key(0), cond_dim=4, vocab_size=3)
    assert isinstance(head, SoftmaxHead)


def test_name_of_finds_a_class_and_loads_only_its_plugin(registry):
    assert registry.name_of(SoftmaxHead) == "softmax"
    import plugin_a_mod  # imported as a user would, not through the registry

    assert registry.name_of(plugin_a_mod.AlphaHead) == "alpha"
    assert "plugin_b_mod" not in sys.modules
    with pytest.raises(InvalidComponentError, match="not a registered output head"):
        registry.name_of(DiffusionHead)


# -- the slots of a model ---------------------------------------------------------------------
def test_each_slot_names_its_kinds_registry():
    assert {name: slot.registry for name, slot in SLOTS.items()} == {
        "tokenizer": TOKENIZERS, "head": HEADS, "order": ORDERS, "backbone": BACKBONES,
        "text_encoder": TEXT_ENCODERS,
    }
    assert all(slot.name == name for name, slot in SLOTS.items())


def test_slot_builds_with_the_derived_arguments_its_class_takes():
    import jax.random as jr

    head = SLOTS["head"].build(ComponentSpec(name="softmax"),
                               {"cond_dim": 4, "token_dim": 6, "vocab_size": 3}, key=jr.key(0))
    assert isinstance(head, SoftmaxHead) and (head.cond_dim, head.vocab_size) == (4, 3)
    # The builder gives a value for every derived argument, and no other.
    with pytest.raises(ValueError, match="derives"):
        SLOTS["head"].build(ComponentSpec(name="softmax"), {"cond_dim": 4, "vocab_size": 3},
                            key=jr.key(0))
    with pytest.raises(ValueError, match="derives"):
        SLOTS["order"].build(ComponentSpec(name="raster"), {"dim": 4})


def test_slot_check_refuses_derived_unknown_and_misspelt_arguments():
    SLOTS["backbone"].check(ComponentSpec(name="causal", kwargs={"depth": 1, "num_heads": 2}))
    with pytest.raises(TypeError, match=r"\['dim'\] are derived"):
        SLOTS["backbone"].check(ComponentSpec(name="causal", kwargs={"dim": 8}))
    with pytest.raises(TypeError, match="Did you mean 'depth'"):
        SLOTS["backbone"].check(ComponentSpec(name="causal", kwargs={"detph": 1}))
    with pytest.raises(UnknownComponentError, match="Did you mean 'causal'"):
        SLOTS["backbone"].check(ComponentSpec(name="casual"))
    # A required argument the builder derives is not missing (`cond_dim`, `vocab_size`).
    SLOTS["head"].check(ComponentSpec(name="softmax"))


def test_example_plugin_is_found_through_the_real_registry():
    # conftest exposes examples/plugin_head as an installed distribution; its name is its
    # own, beside the built-in `flow` head.
    entries = {e.name: e for e in HEADS.entries()}
    assert entries["mlp_flow"].source == "fluid-flow-head"
    cls = HEADS.get("mlp_flow")
    assert cls.__module__ == "fluid_flow_head"
    assert entries["flow"].source == BUILTIN_SOURCE and HEADS.get("flow") is FlowHead


def test_components_command_lists_plugins_with_source(tmp_path):
    make_distribution(
        tmp_path, "plugin-z", {"fluid.orders": {"zigzag": "nowhere:Zig"}}
    )
    out = subprocess.run(
        [sys.executable, "-m", "fluid.cli", "components"],
        capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])},
    ).stdout
    assert "zigzag" in out and "plugin-z" in out  # listed without importing `nowhere`
    assert "diffusion" in out and BUILTIN_SOURCE in out
    for registry in [slot.registry for slot in SLOTS.values()] + [CAPTION_TOKENIZERS]:
        assert f"({registry.group}):" in out
        assert all(f"  {e.name} " in out for e in registry.entries() if e.source == BUILTIN_SOURCE)
    assert fluid.CAPTION_TOKENIZERS is CAPTION_TOKENIZERS
