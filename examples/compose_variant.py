"""A variant the paper never tried, assembled by hand from registry parts.

Discrete palette tokens with the diffusion head are refused (they do not fit); here is a
cell that does: continuous patch tokens, raster order, but a *bidirectional* backbone (a
MaskGIT-style model that learns to complete a raster prefix), with the built-in
flow-matching head (`flow`; the example plug-in `mlp_flow` would do as well once installed).

    python examples/compose_variant.py
"""

import jax.random as jr
import numpy as np

from fluid import BACKBONES, CONTINUOUS, HEADS, ORDERS, TEXT_ENCODERS, TOKENIZERS, FluidModel
from fluid.data.shapes import ShapesDataset
from fluid.model import TokenEmbedding
from fluid.recipes import make_text_tokenizer
from fluid.text import TextAligner

keys = jr.split(jr.key(0), 6)
data = ShapesDataset(image_size=32)
text_tokenizer = make_text_tokenizer(data, vocab_size=128)
width = 128

tokenizer = TOKENIZERS.build("patch", image_size=32, patch_size=4)
text_encoder = TEXT_ENCODERS.build(
    "learned", vocab_size=text_tokenizer.vocab_size, dim=64, depth=1, num_heads=4, max_len=24,
    key=keys[0],
)
head_name = "flow"
head = HEADS.build(head_name, cond_dim=width, token_dim=tokenizer.token_dim, width=128,
                   key=keys[1])
model = FluidModel(
    tokenizer=tokenizer,
    text_encoder=text_encoder,
    aligner=TextAligner(text_encoder.dim, width, 1, 4, key=keys[2]),
    token_embedding=TokenEmbedding(CONTINUOUS, tokenizer.token_dim, None, width, key=keys[3]),
    backbone=BACKBONES.build("bidirectional", dim=width, depth=2, num_heads=4,
                             seq_len=tokenizer.seq_len, key=keys[4]),
    head=head,
    order=ORDERS.build("raster"),
    null_text=tuple(a[0] for a in text_tokenizer.encode([""], 24)),
)

items = [data[i] for i in range(8)]
ids, mask = text_tokenizer.encode([it["caption"] for it in items], 24)
batch = {"image": np.stack([it["image"] for it in items]), "text_ids": ids, "text_mask": mask}
print(f"head {head_name!r}, loss of the untrained model:", float(model.loss(batch, key=keys[5])))
images = model.generate(ids[:2], mask[:2], key=keys[5], steps=1, cfg=1.0)
print("generated:", images.shape)
