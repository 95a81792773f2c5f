"""Analytic matmul FLOPs of a fluid model, from its `ModelConfig` alone.

Only matrix products count (2 m n k each): attention projections, attention scores and
values, MLPs, cross-attention to the text, the text encoder and aligner, the token embedding
and the output head. Normalisations, activations, softmax, the optimizer and other
elementwise work do not, nor do embedding-table gathers. A training step is taken as 3x
the forward pass of the trainable parts (one forward, two backward matmuls per forward one:
the usual convention; see `train_flops`) plus 1x the forward pass of frozen parts.

What is counted follows what the implementation computes, not more:

- attention over all `seq` keys at every query, causal or not (a mask does not skip work);
- in training the diffusion head runs at every position (targets are chosen by weights,
  as in MAR), `batch_mul` times with fresh `(t, noise)`; the condition's projection
  (`cond_embed`) depends on the position only, and `jax.vmap` over the draws computes it
  once per position;
- in sampling, one head evaluation is one noisy token through the denoising MLP; under
  guidance both halves share the input projection and the timestep MLP (`jax.vmap` over an
  unbatched input), and the timestep MLP is shared by every token of a step.
"""

import functools
import math
import re

from fluid.config import ModelConfig

TIMESTEP_FREQUENCIES = 256  # fluid.heads._adaln_mlp.FREQUENCY_DIM


def token_grid(config: ModelConfig) -> tuple[int, int, int | None]:
    """`(seq_len, token_dim, vocab_size)` of the configured image tokenizer (no weights are
    made: `fluid.build.abstract_model`)."""
    from fluid.build import abstract_model

    tok = abstract_model(config).tokenizer
    return tok.seq_len, tok.token_dim, tok.vocab_size


def block_flops(seq: int, dim: int, *, mlp_ratio: float = 4.0, context: int = 0,
                context_dim: int | None = None) -> dict[str, int]:
    """Forward matmul FLOPs of one pre-LN transformer block over `seq` tokens of width `dim`
    (fused qkv, output projection, MLP of `mlp_ratio * dim`), with cross-attention to
    `context` tokens of width `context_dim` if `context > 0`."""
    hidden = int(dim * mlp_ratio)
    out = {
        "attn_qkv": 2 * seq * dim * 3 * dim,
        "attn_scores": 2 * seq * seq * dim,
        "attn_values": 2 * seq * seq * dim,
        "attn_proj": 2 * seq * dim * dim,
        "mlp": 2 * seq * dim * hidden * 2,
    }
    if context:
        cdim = context_dim or dim
        out |= {
            "cross_q": 2 * seq * dim * dim,
            "cross_kv": 2 * context * cdim * 2 * dim,
            "cross_scores": 2 * seq * context * dim,
            "cross_values": 2 * seq * context * dim,
            "cross_proj": 2 * seq * dim * dim,
        }
    return out


def _scaled(d: dict[str, int], k: float) -> dict[str, int]:
    return {name: int(v * k) for name, v in d.items()}


def _add(*ds: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def diffusion_network_flops(cond_dim: int, token_dim: int, width: int, depth: int) -> dict:
    """Forward matmul FLOPs of one evaluation of MAR's denoising MLP, per layer: the noisy
    token's projection, the timestep MLP, the condition's projection, the AdaLN residual
    blocks (modulation, fc1, fc2) and the final AdaLN layer."""
    return {
        "input_proj": 2 * token_dim * width,
        "time_fc1": 2 * TIMESTEP_FREQUENCIES * width,
        "time_fc2": 2 * width * width,
        "cond_embed": 2 * cond_dim * width,
        "adaln_blocks": depth * (2 * width * 3 * width + 2 * 2 * width * width),
        "final": 2 * width * 2 * width + 2 * width * 2 * token_dim,
    }


def _spec(config: ModelConfig, slot: str) -> dict:
    return dict(getattr(config, slot).kwargs)


def forward_flops(config: ModelConfig, *, seq_len: int, token_dim: int,
                  vocab_size: int | None = None) -> dict[str, dict[str, int]]:
    """Forward matmul FLOPs of ONE training example, per part and per kind of product.

    **Returns:**

    `{part: {product: flops}}` with parts `text_encoder`, `aligner`, `token_embedding`,
    `backbone` and `head`.
    """
    n, d, L = seq_len, config.width, config.text_len
    text = _spec(config, "text_encoder")
    if config.text_encoder.name != "learned":
        raise NotImplementedError(
            f"FLOPs of the {config.text_encoder.name!r} text encoder are not counted here."
        )
    dt = text["dim"]
    parts = {
        "text_encoder": _scaled(block_flops(L, dt), text["depth"]),
        "aligner": _add({"proj": 2 * L * dt * d},
                        _scaled(block_flops(L, d), config.aligner_depth)),
    }
    continuous = config.head.name == "diffusion"
    parts["token_embedding"] = {"linear": 2 * n * token_dim * d} if continuous else {}
    back = _spec(config, "backbone")
    parts["backbone"] = _scaled(
        block_flops(n, d, mlp_ratio=back.get("mlp_ratio", 4.0), context=L), back["depth"]
    )
    head = _spec(config, "head")
    if continuous:
        net = diffusion_network_flops(d, token_dim, head.get("width", 1024),
                                      head.get("depth", 3))
        mul = head.get("batch_mul", 4)
        parts["head"] = {k: n * v * (1 if k == "cond_embed" else mul) for k, v in net.items()}
    elif config.head.name == "softmax":
        assert vocab_size is not None
        parts["head"] = {"logits": 2 * n * d * vocab_size}
    else:
        raise NotImplementedError(f"FLOPs of the {config.head.name!r} head are not counted here.")
    return parts


def train_flops(config: ModelConfig, *, batch: int, seq_len: int, token_dim: int,
                vocab_size: int | None = None) -> dict:
    """Matmul FLOPs of one training step of `batch` examples.

    `train = 3 x forward` of trainable parts (a frozen text encoder, `trainable=False`,
    counts 1x: no backward). The convention counts a backward product for every forward one
    twice (input and weight gradients); the first products of a chain (the token embedding,
    the head's input projection and timestep MLP, the text aligner's projection of a frozen
    encoder) need no input gradient, so the exact count is a little lower, and XLA's is
    (see `benchmarks/mfu.py`).

    **Returns:**

    `{"forward": {part: flops}, "train": {part: flops}, "forward_total", "train_total",
    "train_total_exact", "forward_detail": {part: {product: flops}}}`, per step (the whole
    batch); `train_total_exact` leaves out the input gradients nobody needs, which is what
    XLA's dots add up to.
    """
    detail = forward_flops(config, seq_len=seq_len, token_dim=token_dim, vocab_size=vocab_size)
    trainable_text = _spec(config, "text_encoder").get("trainable", True)
    forward = {part: batch * sum(v.values()) for part, v in detail.items()}
    train = {
        part: f * (1 if part == "text_encoder" and not trainable_text else 3)
        for part, f in forward.items()
    }
    # Products whose input is data, not a parameter's function: no input gradient.
    no_input_grad = detail["token_embedding"].get("linear", 0)
    no_input_grad += detail["head"].get("input_proj", 0) + detail["head"].get("time_fc1", 0)
    if not trainable_text:
        no_input_grad += detail["aligner"]["proj"]
    return {
        "forward": forward,
        "train": train,
        "forward_total": sum(forward.values()),
        "train_total": sum(train.values()),
        "train_total_exact": sum(train.values()) - batch * no_input_grad,
        "forward_detail": {p: _scaled(v, batch) for p, v in detail.items()},
    }


def head_evaluations(config: ModelConfig, *, seq_len: int, guided: bool) -> int:
    """Diffusion-head network evaluations to sample ONE image: every token is denoised
    through every step of the sampling chain, twice under guidance (conditional and
    unconditional halves), whatever the order and the number of sampling steps."""
    head = _spec(config, "head")
    return seq_len * head.get("sampling_steps", 100) * (2 if guided else 1)


def bidirectional_pass_flops(config: ModelConfig, *, seq_len: int,
                             rows: int | None = None) -> int:
    """Matmul FLOPs of one bidirectional backbone pass over `seq_len` positions, or of
    `at_positions` on `rows` of them: the last block then computes its qkv projection (keys
    and values of every position) and the context's keys and values in full, the rest of
    it on `rows` positions only."""
    back = _spec(config, "backbone")
    depth, n = back["depth"], seq_len
    block = block_flops(n, config.width, mlp_ratio=back.get("mlp_ratio", 4.0),
                        context=config.text_len)
    full = sum(block.values())
    if rows is None or depth == 0:
        return depth * full
    every_row = block["attn_qkv"] + block["cross_kv"]
    return (depth - 1) * full + every_row + (full - every_row) * rows // n


def sample_flops(config: ModelConfig, *, seq_len: int, token_dim: int, steps: int,
                 guided: bool, vocab_size: int | None = None) -> dict[str, int]:
    """Matmul FLOPs to sample ONE image: the backbone (for the random order, a forward pass
    per step whose last block computes only that step's positions past its key/value
    projections; one cached position per token, plus the context projections, for a causal
    backbone), the token embedding, the text side and the head.

    `steps`: steps of the random order (ignored by raster, one token per step).
    """
    halves = 2 if guided else 1
    detail = forward_flops(config, seq_len=seq_len, token_dim=token_dim, vocab_size=vocab_size)
    n, d, L = seq_len, config.width, config.text_len
    out = {
        "text": halves * (sum(detail["text_encoder"].values()) + sum(detail["aligner"].values())),
    }
    back = _spec(config, "backbone")
    depth = back["depth"]
    if config.backbone.name == "causal":
        step = block_flops(1, d, mlp_ratio=back.get("mlp_ratio", 4.0), context=L)
        # The cache is read at all `n` positions (masked), and the context's keys and values
        # are projected once by `init_cache`, not at every step.
        step["attn_scores"] = step["attn_values"] = 2 * n * d
        cross_kv = step.pop("cross_kv")
        out["backbone"] = halves * depth * (n * sum(step.values()) + cross_kv)
        out["token_embedding"] = n * 2 * token_dim * d if token_dim else 0
    elif config.backbone.name == "arpg":
        # Every token passes the content blocks once, through their cache (`observe`; the
        # start too), and every query the query blocks once (`decode`), whatever `steps`.
        query_depth = back.get("query_depth") or depth // 2
        step = block_flops(1, d, mlp_ratio=back.get("mlp_ratio", 4.0), context=L)
        step["attn_scores"] = step["attn_values"] = 2 * (n + 1) * d
        cross_kv = step.pop("cross_kv")
        content = (depth - query_depth) * ((n + 1) * sum(step.values()) + cross_kv)
        query = {
            "memory_kv": 2 * d * 2 * d,  # the new memory entry's keys and values
            "memory_q": 2 * d * d,
            "memory_scores": 2 * (n + 1) * d,
            "memory_values": 2 * (n + 1) * d,
            "memory_proj": 2 * d * d,
            "text_q": 2 * d * d,
            "text_scores": 2 * L * d,
            "text_values": 2 * L * d,
            "text_proj": 2 * d * d,
            "mlp": 2 * d * int(d * back.get("mlp_ratio", 4.0)) * 2,
        }
        text_kv = 2 * L * d * 2 * d  # projected once per query block
        out["backbone"] = halves * (content + query_depth * (n * sum(query.values()) + text_kv))
        out["token_embedding"] = n * 2 * token_dim * d if token_dim else 0
    else:
        # One `at_positions` pass per step; its count is linear in the positions produced,
        # which add up to `n` over the loop.
        fixed = bidirectional_pass_flops(config, seq_len=n, rows=0)
        out["backbone"] = halves * (steps * fixed + bidirectional_pass_flops(config, seq_len=n)
                                    - fixed)
        out["token_embedding"] = steps * sum(detail["token_embedding"].values())
    head = _spec(config, "head")
    if config.head.name == "diffusion":
        net = diffusion_network_flops(d, token_dim, head.get("width", 1024), head.get("depth", 3))
        chain = head.get("sampling_steps", 100)
        per_token = chain * (halves * (net["cond_embed"] + net["adaln_blocks"] + net["final"])
                             + net["input_proj"])
        time_mlp = net["time_fc1"] + net["time_fc2"]
        calls = steps if config.order.name == "random" else n
        out["head"] = n * per_token + chain * time_mlp * calls
    else:
        out["head"] = n * halves * 2 * d * (vocab_size or 0)
    out["total"] = sum(out.values())
    return out


def train_products(config: ModelConfig, *, batch: int, seq_len: int,
                   token_dim: int) -> list[dict]:
    """The matrix products of one training step's forward pass, by shape: each a dict of
    `name`, `count` (how many times per step), `batch` (batch dims of a batched product),
    `m`, `k`, `n` (`[batch, m, k] x [batch, k, n]`). Their FLOPs add up to the forward
    count of `train_flops` (continuous tokens, `learned` text encoder)."""
    n, d, L, B = seq_len, config.width, config.text_len, batch
    text = _spec(config, "text_encoder")
    back = _spec(config, "backbone")
    head = _spec(config, "head")
    heads = back["num_heads"]
    hidden = int(d * back.get("mlp_ratio", 4.0))

    def blocks(prefix, count, seq, dim, nheads, cross):
        out = [
            (f"{prefix}.qkv", count, 1, B * seq, dim, 3 * dim),
            (f"{prefix}.scores", count, B * nheads, seq, dim // nheads, seq),
            (f"{prefix}.values", count, B * nheads, seq, seq, dim // nheads),
            (f"{prefix}.proj", count, 1, B * seq, dim, dim),
            (f"{prefix}.fc1", count, 1, B * seq, dim, 4 * dim if prefix != "backbone"
             else hidden),
            (f"{prefix}.fc2", count, 1, B * seq, 4 * dim if prefix != "backbone" else hidden,
             dim),
        ]
        if cross:
            out += [
                (f"{prefix}.cross_q", count, 1, B * seq, dim, dim),
                (f"{prefix}.cross_kv", count, 1, B * L, dim, 2 * dim),
                (f"{prefix}.cross_scores", count, B * nheads, seq, dim // nheads, L),
                (f"{prefix}.cross_values", count, B * nheads, seq, L, dim // nheads),
                (f"{prefix}.cross_proj", count, 1, B * seq, dim, dim),
            ]
        return out

    rows = []
    if text["depth"]:
        rows += blocks("text_encoder", text["depth"], L, text["dim"], text["num_heads"], False)
    rows.append(("aligner.proj", 1, 1, B * L, text["dim"], d))
    if config.aligner_depth:
        rows += blocks("aligner", config.aligner_depth, L, d, config.aligner_heads, False)
    rows.append(("token_embedding", 1, 1, B * n, token_dim, d))
    rows += blocks("backbone", back["depth"], n, d, heads, True)
    w, hd, mul = head.get("width", 1024), head.get("depth", 3), head.get("batch_mul", 4)
    r = B * n * mul
    rows += [
        ("head.input_proj", 1, 1, r, token_dim, w),
        ("head.time_fc1", 1, 1, r, TIMESTEP_FREQUENCIES, w),
        ("head.time_fc2", 1, 1, r, w, w),
        ("head.cond_embed", 1, 1, B * n, d, w),
        ("head.modulation", hd, 1, r, w, 3 * w),
        ("head.fc1", hd, 1, r, w, w),
        ("head.fc2", hd, 1, r, w, w),
        ("head.final_modulation", 1, 1, r, w, 2 * w),
        ("head.final_linear", 1, 1, r, w, 2 * token_dim),
    ]
    return [dict(zip(("name", "count", "batch", "m", "k", "n"), row)) for row in rows]


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*\w+\[([\d,]*)\]")
_DOT = re.compile(
    r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*\w+\[([\d,]*)\][^ ]*\s+dot\(%([\w.\-]+),\s*%[\w.\-]+\)"
    r".*?lhs_contracting_dims=\{([\d,]*)\}"
)


def _dims(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def hlo_dot_flops(hlo_text: str) -> tuple[int, int]:
    """FLOPs of every `dot` in an optimised HLO module's text (`compiled.as_text()`):
    `2 * prod(output) * prod(contracted lhs dims)` each, and how many dots there are.

    Dots inside a `while` body are counted once (as XLA's cost analysis does): unroll the
    scans first (`benchmarks/mfu.py`'s `unrolled_scans`) to count every iteration.
    """
    shapes = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            shapes[m.group(1)] = _dims(m.group(2))
    total = count = 0
    for line in hlo_text.splitlines():
        m = _DOT.match(line)
        if not m:
            continue
        out, lhs, contracting = _dims(m.group(1)), shapes[m.group(2)], _dims(m.group(3))
        total += 2 * math.prod(out) * math.prod(lhs[i] for i in contracting)
        count += 1
    return total, count


_FUNC = re.compile(r"^\s*func\.func\s+(?:public\s+|private\s+)?@([\w.$\-]+)\(")
_CALL = re.compile(r"\bcall @([\w.$\-]+)\(")
_SDOT = re.compile(
    r"stablehlo\.dot_general .*contracting_dims = \[([\d, ]*)\] x \[[\d, ]*\].*"
    r":\s*\(tensor<([\dx]*)x?[a-z]\w*>, tensor<[^>]*>\)\s*->\s*tensor<([\dx]*)x?[a-z]\w*>"
)


def _tensor_dims(s: str) -> list[int]:
    return [int(x) for x in s.split("x") if x]


def stablehlo_dot_flops(text: str) -> int:
    """FLOPs of every `dot_general` of a lowered module's StableHLO text
    (`jax.jit(f).lower(...).as_text()`), each function's dots counted once per call: no
    compilation needed. Loop bodies count once; unroll the scans first."""
    funcs: dict[str, list] = {}
    current = None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            current = funcs.setdefault(m.group(1), [0, []])
            continue
        if current is None:
            continue
        d = _SDOT.search(line)
        if d:
            contracting = [int(x) for x in d.group(1).replace(" ", "").split(",") if x]
            lhs, out = _tensor_dims(d.group(2)), _tensor_dims(d.group(3))
            current[0] += 2 * math.prod(out) * math.prod(lhs[i] for i in contracting)
        current[1].extend(_CALL.findall(line))

    @functools.cache
    def total(name: str) -> int:
        own, callees = funcs[name]
        return own + sum(total(c) for c in callees)

    return total("main")
