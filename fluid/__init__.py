"""fluid: autoregressive text-to-image generation (Fluid, MAR) as composable JAX components."""

__version__ = "0.1.0"
