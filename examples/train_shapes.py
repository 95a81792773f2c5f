"""Train a text-to-image model on the built-in `shapes` data, then sample a grid.

    python examples/train_shapes.py                       # the Fluid variant, ~15 min on a CPU
    python examples/train_shapes.py discrete-raster 500   # another variant, 500 steps

Reads top to bottom: a preset, its recipe and the library's trainer, a sample grid, a loss
curve.
"""

import sys

import jax.random as jr

from fluid.data.shapes import DEMO_PROMPTS
from fluid.presets import get_config
from fluid.recipes import prepare
from fluid.sample import sample_images
from fluid.viz import save_grid, save_loss_curve

variant = sys.argv[1] if len(sys.argv) > 1 else "fluid"
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
out = f"runs/shapes-{variant}"

# 1. A configuration: the variant's parts (tokenizer, head, order, backbone, text encoder),
#    the optimiser (AdamW, b1 0.9, b2 0.95, weight decay 0.02, warm-up, EMA) and the data.
config = get_config(f"shapes-{variant}", steps=steps)

# 2. The recipe wires the run: it reads the data, fits the caption tokenizer and data-fitted
#    parts (the palette codebook), builds the model and hands the trainer (`fluid.train`,
#    which knows no model) the model, its objective and a loader. The trainer jits the whole
#    step and shows a progress bar.
recipe = prepare(config, out_dir=out)
history = recipe.run()
recipe.save()

# 3. Sample with the EMA weights: MAR's cosine schedule, linear guidance.
images = sample_images(
    recipe.model(ema=True),
    recipe.text_tokenizer,
    DEMO_PROMPTS,
    text_len=config.model.text_len,
    key=jr.key(0),
    steps=config.sample_steps,
    cfg=config.sample_cfg,
)
print("samples:", save_grid(images, f"{out}/samples.png", captions=DEMO_PROMPTS, cols=4))
print("loss:   ", save_loss_curve([r["step"] for r in history], [r["loss"] for r in history],
                                  f"{out}/loss.png"))
