"""Training: the one trainer of fluid, its optimiser and data."""

from ._data import Batches as Batches
from ._data import make_text_tokenizer as make_text_tokenizer
from ._optim import decay_mask as decay_mask
from ._optim import learning_rate_schedule as learning_rate_schedule
from ._optim import make_optimizer as make_optimizer
from ._optim import trainable_mask as trainable_mask
from ._trainer import Trainer as Trainer
from ._trainer import TrainState as TrainState
from ._trainer import load_model as load_model
