"""retrac: which training samples made a diffusion model's output.

Diffusion-TracIn, Diffusion-ReTrac and (D-)TRAK attribution from per-sample gradients at several
timesteps and checkpoints, randomly projected, stored in Zarr and served from a FAISS index.
"""

from retrac.checkpoints import Checkpoint
from retrac.data import ImageDataset, load_dataset
from retrac.errors import RetracError
from retrac.indexer import FeatureStore, IndexConfig, featurize_dataset
from retrac.query.attribution import AttributionResult, Attributor, QueryEvents, build_attribution_index
from retrac.task import DiffusionTask

__version__ = "0.1.0"

__all__ = [
    "AttributionResult",
    "Attributor",
    "Checkpoint",
    "DiffusionTask",
    "FeatureStore",
    "ImageDataset",
    "IndexConfig",
    "QueryEvents",
    "RetracError",
    "build_attribution_index",
    "featurize_dataset",
    "load_dataset",
]
