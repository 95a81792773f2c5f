"""Pictures: sample grids with their captions, loss curves."""

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._errors import ConfigError


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] to uint8 in [0, 255]."""
    return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def check_figure_path(path: str | Path) -> Path:
    """Refuse, before any work, a file name that `save_grid` could not write: its suffix
    must be a format matplotlib saves (png, jpg, pdf, svg, ...)."""
    from matplotlib.figure import Figure

    path = Path(path)
    formats = sorted(Figure().canvas.get_supported_filetypes())
    if path.suffix.lower().lstrip(".") not in formats:
        raise ConfigError(
            f"cannot write a picture to {str(path)!r}: its name must end in one of "
            f"{', '.join('.' + f for f in formats)} (e.g. samples.png)."
        )
    return path


def save_grid(
    images: np.ndarray,
    path: str | Path,
    captions: Sequence[str] | None = None,
    cols: int | None = None,
    scale: int = 4,
) -> Path:
    """Write a PNG grid of images in [-1, 1] (upscaled by `scale`), captioned if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = to_uint8(images)
    n = len(images)
    cols = cols or min(n, 8)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.2 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i].repeat(scale, 0).repeat(scale, 1), interpolation="nearest")
            if captions is not None:
                ax.set_title("\n".join(textwrap.wrap(captions[i], 22)), fontsize=7)
    fig.tight_layout()
    path = check_figure_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_loss_curve(steps: Sequence[int], losses: Sequence[float], path: str | Path, title: str = "training loss") -> Path:
    """Write a PNG of the loss against steps, with a moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = np.asarray(steps), np.asarray(losses)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="per step")
    w = max(1, len(losses) // 25)
    if len(losses) > w:
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], smooth, lw=1.5, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
