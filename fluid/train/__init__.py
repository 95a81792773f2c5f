"""Training: the one trainer of fluid, its optimiser, sharding, checkpoints and data.

Checkpoints, the metrics log and loading a trained model belong to the run folder
(`fluid.run`); their names are re-exported here as they always were.
"""

from ..run import CheckpointCorruptError as CheckpointCorruptError
from ..run import CheckpointManager as CheckpointManager
from ..run import CheckpointMismatchError as CheckpointMismatchError
from ..run import SavedWeights as SavedWeights
from ..run import SummaryWriter as SummaryWriter
from ..run import find_weights as find_weights
from ..run import load_model as load_model
from ._cache import CachedSource as CachedSource
from ._cache import CacheMismatchError as CacheMismatchError
from ._cache import build_cache as build_cache
from ._cache import cache_fingerprint as cache_fingerprint
from ._data import caption_tokenizer as caption_tokenizer
from ._data import fit_images as fit_images
from ._data import make_loader as make_loader
from ._data import make_source as make_source
from ._data import make_text_tokenizer as make_text_tokenizer
from ._interrupt import TrainingInterrupted as TrainingInterrupted
from ._optim import decay_mask as decay_mask
from ._optim import learning_rate_schedule as learning_rate_schedule
from ._optim import make_optimizer as make_optimizer
from ._optim import trainable_mask as trainable_mask
from ._sharding import RULES as RULES
from ._sharding import create_sharded as create_sharded
from ._sharding import describe_shardings as describe_shardings
from ._sharding import make_mesh as make_mesh
from ._sharding import param_shardings as param_shardings
from ._sharding import shard_batch as shard_batch
from ._sharding import state_shardings as state_shardings
from ._tasks import TASKS as TASKS
from ._tasks import GenerateTask as GenerateTask
from ._tasks import Task as Task
from ._tasks import TokenizerTask as TokenizerTask
from ._tasks import get_task as get_task
from ._trainer import Trainer as Trainer
from ._trainer import TrainState as TrainState
from ._trainer import cast_backbone as cast_backbone
from ._trainer import resolve_precision as resolve_precision
