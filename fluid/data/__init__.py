"""Data: the built-in procedural `shapes` data set, sources for a user's images and captions
(a folder, a JSONL file, class folders in ImageFolder's layout) and the Grain loader that
batches any of them."""

from ..config import ON_CHANGE as ON_CHANGE
from ._files import IMAGE_EXTENSIONS as IMAGE_EXTENSIONS
from ._files import MAX_IMAGE_PIXELS as MAX_IMAGE_PIXELS
from ._files import BadRecord as BadRecord
from ._files import FolderSource as FolderSource
from ._files import JsonlSource as JsonlSource
from ._files import SkippedRecordWarning as SkippedRecordWarning
from ._files import center_crop as center_crop
from ._files import load_image as load_image
from ._imagefolder import ImageFolderSource as ImageFolderSource
from ._pipeline import DataStreamChangedError as DataStreamChangedError
from ._pipeline import Loader as Loader
from ._pipeline import RandomAccessSource as RandomAccessSource
