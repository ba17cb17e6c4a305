"""The train side: dataset x checkpoints x events -> a resumable, sharded Zarr feature store.

``featurize_dataset`` writes the store (docs/design.md section 3); ``FeatureStore.open`` reads it.
"""

from retrac.indexer.config import IndexConfig
from retrac.indexer.featurize import featurize_dataset, parse_shard
from retrac.indexer.store import FeatureBlock, FeatureStore

__all__ = ["FeatureBlock", "FeatureStore", "IndexConfig", "featurize_dataset", "parse_shard"]
