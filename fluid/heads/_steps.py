"""Step schedules over generation progress (DiSA) for heads that sample by a chain."""

import math


def progress_level(levels: int, progress: float) -> int:
    """The interval of `[0, 1]`, cut into `levels` equal ones, that `progress` falls in
    (the last one includes 1; values outside `[0, 1]` are clamped)."""
    return min(max(math.floor(progress * levels), 0), levels - 1)


def annealed_steps(start: int, end: int, levels: int, kind: str = "linear") -> tuple[int, ...]:
    """A `progress_steps` schedule annealed from `start` steps (progress 0) to `end` (progress
    1) over `levels` levels, as DiSA's `linear` and `cosine` schedules (`levels=2` is its
    two-stage one): level `j` of `L` gets `end + (start - end) * w(j / (L - 1))` steps,
    rounded, with `w(u) = 1 - u` (linear) or `(1 + cos(pi u)) / 2` (cosine).

    `annealed_steps(50, 5, 4)` is `(50, 35, 20, 5)`.
    """
    if levels < 2:
        raise ValueError(f"an annealed schedule needs at least 2 levels, got {levels}.")
    if kind not in ("linear", "cosine"):
        raise ValueError(f"kind must be 'linear' or 'cosine', got {kind!r}.")
    out = []
    for j in range(levels):
        u = j / (levels - 1)
        w = 1 - u if kind == "linear" else (1 + math.cos(math.pi * u)) / 2
        out.append(round(end + (start - end) * w))
    return tuple(out)


def as_progress_steps(progress_steps, minimum: int) -> tuple[int, ...] | None:
    """`progress_steps` as a static tuple of ints (a config gives a JSON list), each at
    least `minimum`; `None` stays `None`."""
    if progress_steps is None:
        return None
    steps = tuple(int(s) for s in progress_steps)
    if not steps or min(steps) < minimum or any(s != v for s, v in zip(steps, progress_steps)):
        raise ValueError(
            f"progress_steps must be a non-empty sequence of integers >= {minimum}, got "
            f"{progress_steps!r}."
        )
    return steps
