"""Class-labelled images in torchvision's ImageFolder layout: `root/<class name>/*.png`."""

import os
import typing
import warnings
from pathlib import Path
from typing import Any

from .._errors import MissingInputError
from ._files import IMAGE_EXTENSIONS, _check_size, load_image


@typing.final
class ImageFolderSource:
    """Images sorted into one folder per class, as torchvision's `ImageFolder` reads them.

    The class folders, sorted by name, get the ids `0 .. K-1` (ImageNet's `train/` folder
    gives MAR's labels: `n01440764` is 0); each item's caption is its class id as text
    (`"3"`), which `fluid.text.ClassLabelTokenizer` reads as that class, so a
    class-conditional model (`class_labels` text encoder) trains on it as MAR did. Images
    are searched recursively inside each class folder and ordered by class, then by path.
    As in torchvision, a class folder without images keeps its id (a warning names it);
    unlike torchvision, folders and files whose name starts with `.` (`.ipynb_checkpoints`)
    are ignored, and files of other extensions too.

    **Arguments:**

    - `root`: the folder of class folders.
    - `image_size`: side of the square images returned, in pixels.

    **Attributes:**

    - `classes`: the class names in id order; `class_to_idx`: name to id (torchvision's).
    - `paths`, `labels`: each item's image path (relative to `root`) and class id.

    Items are dicts: `image` (float32 `[image_size, image_size, 3]` in [-1, 1]) and
    `caption` (the class id as text). Reading an item whose image does not decode raises
    `fluid.data.BadRecord`.
    """

    def __init__(self, root: str | os.PathLike, image_size: int):
        self.root = Path(root).absolute()  # workers or a later chdir must find the files
        self.image_size = _check_size(image_size)
        expected = "expected one folder per class holding its images, like root/cat/1.png"
        if not self.root.is_dir():
            raise MissingInputError(f"image folder {self.root} does not exist; {expected}.")
        self.classes: tuple[str, ...] = tuple(sorted(
            entry.name for entry in os.scandir(self.root)
            if entry.is_dir() and not entry.name.startswith(".")
        ))
        if not self.classes:
            raise MissingInputError(f"no class folders in {self.root}; {expected}.")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        paths, labels, empty = [], [], []
        for label, name in enumerate(self.classes):
            found = []
            # Following links lets a data set be assembled from symlinked folders.
            for folder, dirs, files in os.walk(self.root / name, followlinks=True):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found += [Path(folder, f).relative_to(self.root).as_posix() for f in files
                          if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
            if not found:
                empty.append(name)
            paths += sorted(found)
            labels += [label] * len(found)
        if not paths:
            raise MissingInputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class "
                                    f"folders of {self.root}; {expected}.")
        if empty:
            shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10
                                             else "")
            warnings.warn(f"{len(empty)} class folders of {self.root} hold no images (their "
                          f"ids are kept): {shown}.", stacklevel=2)
        self.paths: tuple[str, ...] = tuple(paths)
        self.labels: tuple[int, ...] = tuple(labels)

    def __len__(self) -> int:
        return len(self.paths)

    def caption(self, index: int) -> str:
        """Item `index`'s caption: its class id as text."""
        return str(self.labels[index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = load_image(self.root / self.paths[index], self.image_size)
        return {"image": image, "caption": self.caption(index)}
