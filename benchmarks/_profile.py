"""Where a compiled program spends its time: one call under `jax.profiler`, the time of its
XLA operations grouped by kind (matrix products, copies and transposes, the rest), by the
model part they come from and by the JAX operation that made them.

Parts are the `jax.named_scope`s `FluidModel` opens around its components (`text`,
`backbone`, `head`, `tokenizer`; the backward pass keeps them in its operation names), so a
profile of a train step or of the sampling loop says how much of the time is the backbone's.
Operation times are summed over the threads that run them: on two cores their total can
exceed the wall time of the call.
"""

import collections
import glob
import re
import shutil
from collections.abc import Callable
from typing import Any

import jax

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*\S+\s+([\w\-]+)\(")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_COMMENT = re.compile(r"/\*.*?\*/")
CONTAINERS = {"while", "call", "conditional"}
# `FluidModel`'s named scopes, in the order they are looked for in an operation's name.
PARTS = ("head", "backbone", "text", "tokenizer")


def classify_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """`{instruction: (kind, op_name)}` of an optimised HLO module: kind `"dot"` if the
    instruction is or calls a computation with a dot, `"copy"` for copies and transposes,
    `"container"` for loops and calls (their time is their body's), else `"other"`."""
    comp_dots: dict[str, bool] = {}
    comp_calls: dict[str, list[str]] = {}
    instrs = {}
    current = None
    for line in hlo_text.splitlines():
        c = _COMPUTATION.match(line)
        # A computation's header has no `=` before its body's brace, once the tuple
        # types' `/*index=5*/` comments are dropped; an instruction line has one.
        if c and "=" not in _COMMENT.sub("", line).split("{")[0]:
            current = c.group(1)
            comp_dots[current], comp_calls[current] = False, []
            continue
        m = _INSTRUCTION.match(line)
        if not m or current is None:
            continue
        name, opcode = m.groups()
        called = _CALLED.findall(line)
        comp_calls[current].extend(called)
        if opcode == "dot":
            comp_dots[current] = True
        op_name = _OP_NAME.search(line)
        instrs[name] = (opcode, called, op_name.group(1) if op_name else "")

    memo: dict[str, bool] = {}

    def has_dot(comp: str) -> bool:
        if comp not in memo:
            memo[comp] = False  # guards against cycles of a misread module
            memo[comp] = comp_dots.get(comp, False) or any(
                has_dot(c) for c in comp_calls.get(comp, [])
            )
        return memo[comp]

    out = {}
    for name, (opcode, called, op_name) in instrs.items():
        if opcode in CONTAINERS:
            kind = "container"
        elif opcode == "dot" or any(has_dot(c) for c in called):
            kind = "dot"
        elif opcode in ("copy", "transpose") or "transpose" in name or "copy" in name:
            kind = "copy"
        else:
            kind = "other"
        out[name] = (kind, op_name)
    return out


def part_of(op_name: str) -> str:
    """The model part an operation belongs to: the first of `PARTS` that is a whole
    segment of its name (`.../head/...`, or `transpose(jvp(head))` in the backward pass),
    else `"other"` (loop bookkeeping, the optimizer, copies XLA inserted)."""
    segments = set(re.split(r"[/()]", op_name))
    return next((p for p in PARTS if p in segments), "other")


def source_of(op_name: str) -> str:
    """A short name for the JAX operation: its last two name segments (the einsum spec of
    an attention product, `checkpoint` for a rematerialised layer's), `backward ` in front
    for the backward pass."""
    tail = "/".join(op_name.split("/")[-2:])
    return ("backward " if "transpose(" in op_name else "") + tail


def profile_call(run: Callable[[], Any], hlo_text: str, out_dir: str) -> tuple[dict, Any]:
    """Call `run()` (one execution of the compiled program whose optimised HLO is
    `hlo_text`; it must block until done) under `jax.profiler`, and group the time of its
    XLA operations. Returns the profile and what `run` returned.

    Profile keys: `profiled_op_s` (the sum of every operation's time),
    `profile_fraction_by_kind` (`dot`, `copy`, `other`), `profile_s_by_part` and
    `profile_fraction_by_part` (`PARTS` and `other`), `profile_dot_s_by_part`,
    `profile_top_sources` (the 15 largest `part kind: source` groups, seconds) and
    `profile_top_ops` (the 15 longest instructions, with their operation names).
    """
    shutil.rmtree(out_dir, ignore_errors=True)
    jax.profiler.start_trace(out_dir)
    result = run()
    jax.profiler.stop_trace()
    path = max(glob.glob(f"{out_dir}/**/*.xplane.pb", recursive=True))
    kinds = classify_instructions(hlo_text)
    per_op: dict[str, float] = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in kinds and kinds[event.name][0] != "container":
                    per_op[event.name] += event.duration_ns / 1e9
    by_kind: dict[str, float] = collections.Counter()
    by_part: dict[str, float] = collections.Counter()
    dot_by_part: dict[str, float] = collections.Counter()
    by_source: dict[str, float] = collections.Counter()
    for name, t in per_op.items():
        kind, op_name = kinds[name]
        part = part_of(op_name)
        by_kind[kind] += t
        by_part[part] += t
        if kind == "dot":
            dot_by_part[part] += t
        by_source[f"{part} {kind}: {source_of(op_name)}"] += t
    total = sum(per_op.values())
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:15]
    return {
        "profiled_op_s": total,
        "profile_fraction_by_kind": {k: v / total for k, v in sorted(by_kind.items())},
        "profile_s_by_part": dict(sorted(by_part.items())),
        "profile_fraction_by_part": {k: v / total for k, v in sorted(by_part.items())},
        "profile_dot_s_by_part": dict(sorted(dot_by_part.items())),
        "profile_top_sources": dict(by_source.most_common(15)),
        "profile_top_ops": [{"op": n, "s": t, "kind": kinds[n][0], "op_name": kinds[n][1]}
                            for n, t in top],
    }, result


def print_profile(profile: dict, *, indent: str = "  ", sources: int = 8) -> None:
    """The profile's shares and its largest sources, as `mfu.py` and `sampling.py` print."""
    print(indent + "profile, share of operation time by kind: " + ", ".join(
        f"{k} {v:.2f}" for k, v in profile["profile_fraction_by_kind"].items()))
    print(indent + "by part: " + ", ".join(
        f"{k} {v:.2f} (dots {profile['profile_dot_s_by_part'].get(k, 0.0):.2f} s)"
        for k, v in profile["profile_fraction_by_part"].items()))
    for src, t in list(profile["profile_top_sources"].items())[:sources]:
        print(f"{indent}   {t:7.3f} s  {src}")
