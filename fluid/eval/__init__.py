"""Evaluation: a GenEval-style judge of `shapes` images (`ShapesEval`) and the Frechet
distance between feature statistics with a pluggable feature extractor (`ShapesFeatures`
for `shapes`, `InceptionFeatures` for FID with a user-supplied network)."""

from ._abstract import AbstractFeatureExtractor as AbstractFeatureExtractor
from ._frechet import REFERENCE_COUNT as REFERENCE_COUNT
from ._frechet import REFERENCE_SEED as REFERENCE_SEED
from ._frechet import FeatureStats as FeatureStats
from ._frechet import cache_dir as cache_dir
from ._frechet import feature_stats as feature_stats
from ._frechet import frechet_distance as frechet_distance
from ._frechet import shapes_reference_stats as shapes_reference_stats
from ._inception import InceptionFeatures as InceptionFeatures
from ._shapes_eval import Detection as Detection
from ._shapes_eval import ShapesEval as ShapesEval
from ._shapes_eval import all_prompts as all_prompts
from ._shapes_eval import label_components as label_components
from ._shapes_features import ShapesFeatures as ShapesFeatures
