"""Work stealing for ``retrac index --shard auto``: a shard is claimed by an atomic create with a lease.

docs/design.md section 5. Every worker walks the unfinished ``(checkpoint, shard)`` pairs and computes
those it can claim, so a fast worker takes the shards a slow or dead one has not done.

A claim is the object ``claims/checkpoint-KK/shard-SSSSSS.gGGGGGG.json`` holding the owner and the
lease's end (``expires``, Unix time). It is made by :meth:`ShardClaims.try_acquire` with an atomic
create-if-absent: locally a hard link of a finished temporary file (``link`` fails on an existing
name), on object storage a conditional PUT (``If-None-Match: *`` on S3, ``ifGenerationMatch=0`` on
GCS). The owner renews its lease from a heartbeat thread every third of the lease. A claim is
*stale* when its lease has run out, or at once when its owner is a process of this machine that no
longer exists (a killed worker). A stale claim of generation ``G`` is taken over by creating
generation ``G + 1``: of several workers trying, exactly one create succeeds. The newest generation
is the claim in force; before publishing a shard its owner checks that it still holds it.

After the shard's ledger entry is written the claim objects are deleted, so a finished store holds
no claims. Claims assume clocks agree to well under a lease (NTP) across machines; the data of a
shard is deterministic, so even a worker that stalled past its lease and raced its successor writes
the same bytes.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from retrac._io import process_alive
from retrac.errors import ConfigError
from retrac.indexer.layout import checkpoint_group

DEFAULT_LEASE_SECONDS = 60.0
CLAIM_NAME = re.compile(r"shard-(\d+)\.g(\d+)\.json")


@dataclass
class Claim:
    """A claim this worker holds: checkpoint ``k``, shard ``shard``, generation ``generation``."""

    k: int
    shard: int
    generation: int

    @property
    def key(self) -> str:
        return f"claims/{checkpoint_group(self.k)}/shard-{self.shard:06d}.g{self.generation:06d}.json"


@dataclass
class ShardClaims:
    """The claims of one worker on one store's location.

    Args:
        location: the store's :class:`~retrac.indexer.location.LocalLocation` or ``ObjectLocation``.
        lease_seconds: how long a claim lasts without renewal (renewed every third of it).
        owner: this worker's name (default ``host:pid:random``).
    """

    location: object
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    owner: str = ""
    held: dict[tuple[int, int], Claim] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.lease_seconds > 0:
            raise ConfigError(f"--lease {self.lease_seconds} must be a positive number of seconds.")
        self.host = socket.gethostname()
        self.owner = self.owner or f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # ------------------------------------------------------------------ claims
    def generations(self, k: int) -> dict[int, int]:
        """``{shard: newest claim generation}`` of checkpoint ``k`` (one listing)."""
        newest: dict[int, int] = {}
        for name in self.location.list(f"claims/{checkpoint_group(k)}"):
            if m := CLAIM_NAME.fullmatch(name):
                shard, generation = int(m.group(1)), int(m.group(2))
                newest[shard] = max(newest.get(shard, -1), generation)
        return newest

    def _record(self) -> str:
        return json.dumps(
            {
                "owner": self.owner,
                "host": self.host,
                "pid": os.getpid(),
                "lease_seconds": self.lease_seconds,
                "expires": time.time() + self.lease_seconds,
            },
            sort_keys=True,
        )

    def is_stale(self, record: dict, now: float | None = None) -> bool:
        """Whether a claim record no longer holds: its lease ran out, or its process here is gone."""
        now = time.time() if now is None else now
        if not isinstance(record, dict) or not isinstance(record.get("expires"), (int, float)):
            return True  # unreadable: nobody can renew it
        if record["expires"] < now:
            return True
        if record.get("host") == self.host and isinstance(record.get("pid"), int):
            return not process_alive(record["pid"])
        return False

    def try_acquire(self, k: int, shard: int, newest: int | None = -2) -> bool:
        """Claim shard ``shard`` of checkpoint ``k``; ``True`` when this worker now holds it.

        Args:
            k, shard: the pair.
            newest: its newest claim generation from :meth:`generations` (``None``: no claim yet);
                by default it is listed here.
        """
        if newest == -2:
            newest = self.generations(k).get(shard)
        generation = 0
        if newest is not None:
            text = self.location.read_text(Claim(k, shard, newest).key)
            if text is None:
                return False  # released meanwhile: the shard was just finished (or failed); look again later
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                record = None
            if not self.is_stale(record):
                return False
            generation = newest + 1  # take over a stale claim: exactly one creator of G + 1 wins
        claim = Claim(k, shard, generation)
        if not self.location.create_text(claim.key, self._record()):
            return False
        with self._lock:
            self.held[(k, shard)] = claim
        self._start_heartbeat()
        return True

    def still_holds(self, k: int, shard: int) -> bool:
        """Whether this worker's claim on the pair is still the one in force (no newer generation)."""
        claim = self.held.get((k, shard))
        return claim is not None and self.generations(k).get(shard) == claim.generation

    def release(self, k: int, shard: int, finished: bool) -> None:
        """Drop this worker's claim; with ``finished`` also the older (stale) generations of the pair."""
        with self._lock:
            claim = self.held.pop((k, shard), None)
        if claim is None:
            return
        self.location.delete(claim.key)
        if finished:
            for generation in range(claim.generation):
                self.location.delete(Claim(k, shard, generation).key)

    # ------------------------------------------------------------------ heartbeat
    def _start_heartbeat(self) -> None:
        if self._heartbeat is None or not self._heartbeat.is_alive():
            self._stop.clear()
            self._heartbeat = threading.Thread(target=self._renew_loop, name="retrac-claims", daemon=True)
            self._heartbeat.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            with self._lock:  # held while writing, so a claim released meanwhile is never written back
                for claim in self.held.values():
                    try:
                        self.location.write_text(claim.key, self._record())
                    except Exception:  # noqa: BLE001 - a failed renewal only risks a takeover; next beat retries
                        continue

    def close(self) -> None:
        """Stop renewing and release every claim still held (unfinished)."""
        self._stop.set()
        for k, shard in list(self.held):
            try:
                self.release(k, shard, finished=False)
            except Exception:  # noqa: BLE001 - an unreleased claim goes stale by itself
                continue
