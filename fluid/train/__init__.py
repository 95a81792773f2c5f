"""Training: the one trainer of fluid (which knows no model), its objective interface,
optimiser and sharding.

What a run trains and how its data are wired is `fluid.recipes`'. Checkpoints, the metrics
log and loading a trained model belong to the run folder (`fluid.run`); their names are
re-exported here as they always were.
"""

from ..run import CheckpointCorruptError as CheckpointCorruptError
from ..run import CheckpointManager as CheckpointManager
from ..run import CheckpointMismatchError as CheckpointMismatchError
from ..run import SavedWeights as SavedWeights
from ..run import SummaryWriter as SummaryWriter
from ..run import find_weights as find_weights
from ..run import load_model as load_model
from ._interrupt import TrainingInterrupted as TrainingInterrupted
from ._objective import AbstractObjective as AbstractObjective
from ._objective import ModelLossTerms as ModelLossTerms
from ._optim import decay_mask as decay_mask
from ._optim import learning_rate_schedule as learning_rate_schedule
from ._optim import make_optimizer as make_optimizer
from ._sharding import RULES as RULES
from ._sharding import create_sharded as create_sharded
from ._sharding import describe_shardings as describe_shardings
from ._sharding import make_mesh as make_mesh
from ._sharding import param_shardings as param_shardings
from ._sharding import put_sharded as put_sharded
from ._sharding import shard_batch as shard_batch
from ._sharding import state_shardings as state_shardings
from ._trainer import Trainer as Trainer
from ._trainer import TrainState as TrainState
from ._trainer import config_mesh as config_mesh
from ._trainer import is_main_process as is_main_process
from ._trainer import open_checkpoints as open_checkpoints
from ._trainer import place_model as place_model
