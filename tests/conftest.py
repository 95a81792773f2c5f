"""Test set-up: 8 host devices (before JAX initialises), strict rank and dtype promotion."""

import os

# Tests are dominated by compilation on a 2-core CPU; LLVM's optimisation level changes how
# fast compiled code runs, not what it computes, and level 0 halves compile time.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

# Many tests build a Trainer whose step is the same XLA program as another test's; a
# persistent compilation cache (keyed by the program, jax version and flags, so never
# stale) shared by the xdist workers compiles each program once: measured 3x faster
# Trainer builds after the first.
jax.config.update("jax_compilation_cache_dir",
                  str(Path(tempfile.gettempdir()) / "fluid-tests-xla-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from _plugins import expose_plugin_head  # noqa: E402

# The example plug-in is exposed as an installed distribution before collection, so the
# registry-driven contract tests include it (as they would any installed plug-in).
expose_plugin_head(Path(tempfile.mkdtemp(prefix="fluid-plugin-")))
