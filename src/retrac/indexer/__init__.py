"""The train side: dataset x checkpoints x events -> a resumable, sharded Zarr feature store.

``featurize_dataset`` writes the store (docs/design.md section 3); ``FeatureStore.open`` reads it.
"""

from retrac.indexer.config import IndexConfig
from retrac.indexer.featurize import featurize_dataset
from retrac.indexer.store import FeatureBlock, FeatureStore
from retrac.indexer.workers import default_threads, parse_shard, plan_shards

__all__ = [
    "FeatureBlock",
    "FeatureStore",
    "IndexConfig",
    "default_threads",
    "featurize_dataset",
    "parse_shard",
    "plan_shards",
]
