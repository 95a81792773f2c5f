"""Run folders: what a training run writes, and how it is found and read back.

One module owns a run folder, below both `fluid.train` (which writes it) and `fluid.eval`
(which reads it): its layout (`RunFolder`, every file name in one place), its checkpoints
(`CheckpointManager`), its checksummed model file (`save_model_file`, `load_model_file`), its
metrics log and TensorBoard events, and loading a trained model (`find_weights`,
`load_model`). Nothing here imports the trainer or evaluation.
"""

from .._paths import named_leaves as named_leaves
from .._paths import path_name as path_name
from ._checkpoint import COMMIT_FILE as COMMIT_FILE
from ._checkpoint import CheckpointCorruptError as CheckpointCorruptError
from ._checkpoint import CheckpointManager as CheckpointManager
from ._compat import RESUMABLE_CONFIG_KEYS as RESUMABLE_CONFIG_KEYS
from ._compat import CheckpointMismatchError as CheckpointMismatchError
from ._compat import check_config as check_config
from ._finetune import CopyReport as CopyReport
from ._finetune import InitFromMismatchError as InitFromMismatchError
from ._finetune import SourceModel as SourceModel
from ._finetune import copy_weights as copy_weights
from ._finetune import load_source as load_source
from ._integrity import CorruptModelError as CorruptModelError
from ._integrity import file_digest as file_digest
from ._integrity import load_model_file as load_model_file
from ._integrity import read_model_info as read_model_info
from ._integrity import save_model_file as save_model_file
from ._layout import EvalReport as EvalReport
from ._layout import RunFolder as RunFolder
from ._layout import model_info_path as model_info_path
from ._load import SavedWeights as SavedWeights
from ._load import find_weights as find_weights
from ._load import load_model as load_model
from ._metrics import MetricsLog as MetricsLog
from ._metrics import read_metrics as read_metrics
from ._metrics import truncate_metrics as truncate_metrics
from ._pretrained import PretrainedMismatchError as PretrainedMismatchError
from ._pretrained import is_pretrained as is_pretrained
from ._pretrained import load_pretrained as load_pretrained
from ._pretrained import save_pretrained as save_pretrained
from ._tensorboard import SummaryWriter as SummaryWriter
