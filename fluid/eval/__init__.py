"""Evaluation: a GenEval-style judge of `shapes` images (`ShapesEval`), the Frechet
distance between feature statistics with a pluggable feature extractor (`ShapesFeatures`
for `shapes`, `InceptionFeatures` for FID with a user-supplied network, `CLIPFeatures` for
FD on CLIP features), CLIP itself from a Hugging Face folder (`CLIPEncoder`) and CLIPScore
(`clip_score`), the validation loss measured alike for every variant, `fluid eval`
(`evaluate_checkpoint`: `evaluate` on `shapes`, `evaluate_data` on your own pairs or prompts) and `fluid sweep` (`run_sweep`: the four variants trained at several
sizes and seeds, loss against parameters fitted as a power law, means over seeds with
Student-t intervals by `mean_interval`).

Runs are read through `fluid.run`; only the sweep, which trains, imports `fluid.train`, so
this package sits above the trainer and the trainer never imports it."""

from ._abstract import AbstractFeatureExtractor as AbstractFeatureExtractor
from ._clip import OPENAI_CLIP_MEAN as OPENAI_CLIP_MEAN
from ._clip import OPENAI_CLIP_STD as OPENAI_CLIP_STD
from ._clip import CLIPCaptionTokenizer as CLIPCaptionTokenizer
from ._clip import CLIPEncoder as CLIPEncoder
from ._clip_score import CLIPFeatures as CLIPFeatures
from ._clip_score import clip_score as clip_score
from ._clip_score import clip_scores as clip_scores
from ._evaluate import DEFAULT_SAMPLES as DEFAULT_SAMPLES
from ._evaluate import default_out_dir as default_out_dir
from ._evaluate import evaluate as evaluate
from ._evaluate import evaluate_checkpoint as evaluate_checkpoint
from ._evaluate import generate_images as generate_images
from ._evaluate import model_summary as model_summary
from ._evaluate import write_report as write_report
from ._frechet import REFERENCE_COUNT as REFERENCE_COUNT
from ._frechet import REFERENCE_SEED as REFERENCE_SEED
from ._frechet import FeatureStats as FeatureStats
from ._frechet import cache_dir as cache_dir
from ._frechet import feature_stats as feature_stats
from ._frechet import frechet_distance as frechet_distance
from ._frechet import shapes_reference_stats as shapes_reference_stats
from ._inception import InceptionFeatures as InceptionFeatures
from ._intervals import mean_interval as mean_interval
from ._shapes_eval import Detection as Detection
from ._shapes_eval import ShapesEval as ShapesEval
from ._shapes_eval import all_prompts as all_prompts
from ._shapes_eval import label_components as label_components
from ._shapes_eval import wilson_interval as wilson_interval
from ._shapes_features import ShapesFeatures as ShapesFeatures
from ._sweep import SCALES as SCALES
from ._sweep import SweepScale as SweepScale
from ._sweep import parse_size as parse_size
from ._sweep import run_one as run_one
from ._sweep import run_sweep as run_sweep
from ._sweep import scale_setting as scale_setting
from ._sweep import sweep_config as sweep_config
from ._sweep import sweep_run_name as sweep_run_name
from ._sweep_report import fit_power_law as fit_power_law
from ._sweep_report import fit_power_law_with_floor as fit_power_law_with_floor
from ._user_data import DATA_REFERENCE_COUNT as DATA_REFERENCE_COUNT
from ._user_data import DATA_SAMPLES as DATA_SAMPLES
from ._user_data import GRID_IMAGES as GRID_IMAGES
from ._user_data import data_reference_stats as data_reference_stats
from ._user_data import evaluate_data as evaluate_data
from ._user_data import image_paths as image_paths
from ._user_data import open_pairs as open_pairs
from ._user_data import read_prompts as read_prompts
from ._user_data import seeded_order as seeded_order
from ._validation import MASK_RATIOS as MASK_RATIOS
from ._validation import NOISE_DRAWS as NOISE_DRAWS
from ._validation import VALIDATION_SEED_OFFSET as VALIDATION_SEED_OFFSET
from ._validation import known_counts as known_counts
from ._validation import validation_batches as validation_batches
from ._validation import validation_loss as validation_loss
from ._validation import validation_loss_terms as validation_loss_terms
from ._validation import validation_mask_ratios as validation_mask_ratios
