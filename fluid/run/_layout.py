"""The layout of a run folder: the name of every file that training, `Recipe.save`, the
`fluid` commands and `fluid eval` write into one, in one place.

```
<run>/
  config.json           the resolved TrainConfig (written when training starts, and by save)
  text_tokenizer.model  the caption tokenizer of a generative run (fitted when it starts)
  text_tokenizer.json   which caption tokenizer class it is
  metrics.jsonl         one JSON record per step (MetricsLog)
  tensorboard/          TensorBoard event files (SummaryWriter)
  checkpoints/<step>/   resumable checkpoints of the training state (CheckpointManager)
  samples/step_<n>.png  sample grids drawn during training (sample_every)
  model.eqx             the EMA model, saved by Recipe.save, with model.json beside it
  tokenizer/            what a tokenizer run saves instead: a diffusers folder
  samples.png, loss.png, summary.json   what `fluid train` and `fluid demo` report at the end
  eval/                 `fluid eval`'s report (an EvalReport); eval/step_<n>/ for one checkpoint
```

A pretrained folder (`fluid.run.save_pretrained`, `fluid.load`) holds `config.json`, the caption
tokenizer's two files, `model.safetensors` and a model card, `README.md`.
"""

import dataclasses
import json
import os
import typing
from pathlib import Path

from ..config import TrainConfig, from_dict, to_dict
from ..text import caption_tokenizer_record


def model_info_path(model_file: str | Path) -> Path:
    """The sidecar that records a model file's step, size and checksum: its name ending in
    `.json` (`model.eqx` -> `model.json`)."""
    model_file = Path(model_file)
    if model_file.suffix == ".json":
        # The sidecar would be the model file itself.
        raise ValueError(f"a model file cannot end in .json, got {model_file}.")
    return model_file.with_suffix(".json")


@typing.final
@dataclasses.dataclass(frozen=True, init=False)
class RunFolder:
    """The paths of one run folder (a `Trainer`'s `out_dir`, `fluid train --out`), or of a
    directory `Recipe.save` wrote.

    **Arguments:**

    - `root`: the folder.
    """

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        """The run's config as JSON (`fluid.config.to_dict`; `write_config`, `read_config`)."""
        return self.root / "config.json"

    def write_config(self, config: TrainConfig) -> None:
        self.config.write_text(json.dumps(to_dict(config), indent=1))

    def read_config(self) -> TrainConfig:
        return from_dict(TrainConfig, json.loads(self.config.read_text()))

    @property
    def text_tokenizer(self) -> Path:
        """The caption tokenizer's SentencePiece model (`fluid.text.load_caption_tokenizer`)."""
        return self.root / "text_tokenizer.model"

    @property
    def text_tokenizer_record(self) -> Path:
        """Which caption tokenizer class `text_tokenizer` is (written beside it by `save`)."""
        return caption_tokenizer_record(self.text_tokenizer)

    @property
    def metrics(self) -> Path:
        """One JSON record per training step (`fluid.run.read_metrics`)."""
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        """The folder of TensorBoard event files (`tensorboard --logdir`)."""
        return self.root / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        """The folder of checkpoints, one `<step>/` each (`fluid.run.CheckpointManager`)."""
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        """The checkpoint of `step` (whether or not it exists)."""
        return self.checkpoints / str(step)

    @property
    def sample_grids(self) -> Path:
        """The folder of the sample grids drawn during training."""
        return self.root / "samples"

    def sample_grid(self, step: int) -> Path:
        """The sample grid drawn at `step`."""
        return self.sample_grids / f"step_{step:07d}.png"

    @property
    def model(self) -> Path:
        """The saved EMA model (`fluid.run.save_model_file`)."""
        return self.root / "model.eqx"

    @property
    def model_info(self) -> Path:
        """The step, size and checksum of `model` (`fluid.run.read_model_info`)."""
        return model_info_path(self.model)

    @property
    def weights(self) -> Path:
        """A pretrained folder's model, every array by its dotted path name
        (`fluid.run.save_pretrained`): readable without fluid and without pickle."""
        return self.root / "model.safetensors"

    @property
    def model_card(self) -> Path:
        """A pretrained folder's model card: what the model is, how it was trained, its
        evaluation, how to sample it."""
        return self.root / "README.md"

    @property
    def tokenizer(self) -> Path:
        """A tokenizer run's saved image tokenizer, a diffusers folder (the `kl`/`vq`
        spec's `path`)."""
        return self.root / "tokenizer"

    @property
    def samples(self) -> Path:
        """The final sample grid of `fluid train` / `fluid demo`."""
        return self.root / "samples.png"

    @property
    def loss_curve(self) -> Path:
        """The loss curve of `fluid train` / `fluid demo`."""
        return self.root / "loss.png"

    @property
    def summary(self) -> Path:
        """What `fluid train` / `fluid demo` report at the end, as JSON."""
        return self.root / "summary.json"

    @property
    def eval(self) -> Path:
        """Where `fluid eval <run>` writes its report (an `EvalReport`) by default."""
        return self.root / "eval"

    def eval_of(self, step: int) -> Path:
        """Where `fluid eval <run>/checkpoints/<step>` writes its report by default."""
        return self.eval / f"step_{step:07d}"

    @classmethod
    def of_checkpoint(cls, path: str | Path) -> "tuple[RunFolder, int] | None":
        """The run folder and step of a checkpoint's path, `<run>/checkpoints/<step>`; `None`
        for any other path."""
        path = Path(path)
        run = cls(path.parent.parent)
        if path.name.isdigit() and path.parent == run.checkpoints:
            return run, int(path.name)
        return None


@typing.final
@dataclasses.dataclass(frozen=True, init=False)
class EvalReport:
    """The files of one `fluid eval` report (`fluid.eval.write_report`).

    **Arguments:**

    - `root`: the report's folder (by default `RunFolder.eval` or `RunFolder.eval_of`).
    """

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    @property
    def result(self) -> Path:
        """Every number, as JSON."""
        return self.root / "eval.json"

    @property
    def markdown(self) -> Path:
        """A short report in Markdown."""
        return self.root / "eval.md"

    @property
    def samples(self) -> Path:
        """A grid of the generated images, one row per category."""
        return self.root / "samples.png"
