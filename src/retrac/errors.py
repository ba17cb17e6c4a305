"""The exceptions retrac raises for bad input.

Every error is a ``ValueError`` subclass whose message names the offending input and the remedy.
"""

from __future__ import annotations

__all__ = [
    "RetracError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "GradientError",
    "StoreMismatchError",
    "StoreError",
    "StoreDamagedError",
    "IndexDamagedError",
]


class RetracError(ValueError):
    """Base class of every error retrac raises for bad input or mismatched artifacts."""


class ConfigError(RetracError):
    """An option or argument has an invalid value."""


class DataError(RetracError):
    """Input images, labels or data files do not fit the model or are malformed."""


class CheckpointError(RetracError):
    """A checkpoint is missing, corrupt, or does not fit the other checkpoints."""


class GradientError(RetracError):
    """A per-sample gradient is not finite; the message names the sample and the event."""


class StoreMismatchError(RetracError):
    """A store or index was written with other settings than the ones it is reopened with."""


class StoreError(DataError):
    """A feature store cannot be used as it is on disk (the base of the store's own errors)."""


class StoreDamagedError(StoreError):
    """A store's data no longer matches the digests recorded when it was written (a changed, missing
    or truncated chunk, a forged ledger entry); the message names the checkpoint and the shard and
    the ``retrac index`` command that recomputes them."""


class IndexDamagedError(DataError):
    """An index folder no longer matches what was built: a file whose sha256 differs from the one its
    manifest records (a changed, truncated or replaced ``index.faiss`` or ``kernel.npz``), an edited
    manifest, or vectors of another method than the manifest names; the message names the file and
    the ``retrac build`` command that rebuilds the index."""


class CompactStoreError(StoreError):
    """A use that needs every event's features (re-weighting events, per-event features) was asked of a
    compact store, which keeps only the per-sample train vectors; the message names the use and the remedy."""
