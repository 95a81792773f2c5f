"""Training: the one trainer of fluid, its optimiser, sharding, checkpoints and data."""

from ._checkpoint import CheckpointCorruptError as CheckpointCorruptError
from ._checkpoint import CheckpointManager as CheckpointManager
from ._checkpoint import CheckpointMismatchError as CheckpointMismatchError
from ._data import fit_images as fit_images
from ._data import make_loader as make_loader
from ._data import make_source as make_source
from ._data import make_text_tokenizer as make_text_tokenizer
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
from ._tensorboard import SummaryWriter as SummaryWriter
from ._trainer import Trainer as Trainer
from ._trainer import TrainState as TrainState
from ._trainer import cast_backbone as cast_backbone
from ._trainer import load_model as load_model
from ._trainer import resolve_precision as resolve_precision
