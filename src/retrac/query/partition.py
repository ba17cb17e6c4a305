"""Index parts: the I-th of N contiguous row ranges of a store, and the check that parts cover it once.

docs/design.md section 6. ``retrac build --part I/N`` indexes rows ``[I * N_rows // N, (I + 1) * N_rows // N)``
of the store (``N_rows`` its samples); the manifest's ``part`` entry records ``number`` (``I``, from 0),
``count`` (``N``), ``start`` and ``stop`` (store rows). An index without a ``part`` entry is the whole
store, part ``0/1``. Searches of a part return store rows (``start`` + the row of the part).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from retrac.errors import ConfigError

PART_KEY = "part"  # the manifest entry


@dataclass(frozen=True)
class IndexPart:
    """Rows ``[start, stop)`` of a store: part ``number`` of ``count`` (numbered from 0).

    Attributes:
        number: ``I`` of ``--part I/N``.
        count: ``N``.
        start, stop: the store rows this part indexes.
    """

    number: int
    count: int
    start: int
    stop: int

    @classmethod
    def of(cls, spec: str | tuple[int, int], num_samples: int) -> IndexPart:
        """Part ``"I/N"`` (or ``(I, N)``) of a store of ``num_samples`` rows.

        Raises:
            ConfigError: not ``I/N``, ``I`` outside ``[0, N)``, or more parts than rows.
        """
        if isinstance(spec, str):
            number, sep, count = spec.partition("/")
            try:
                if not sep:
                    raise ValueError
                spec = (int(number), int(count))
            except ValueError:
                raise ConfigError(
                    f"--part {spec!r} is not I/N; e.g. --part 0/4 for the first of 4 parts of the store's rows."
                ) from None
        number, count = int(spec[0]), int(spec[1])
        if count < 1 or not 0 <= number < count:
            raise ConfigError(
                f"--part {number}/{count} is out of range; I must lie in [0, N) with N >= 1, e.g. 0/{max(count, 1)}."
            )
        if count > num_samples:
            raise ConfigError(
                f"--part {number}/{count}: the store has {num_samples} samples, fewer than {count} parts; "
                "give at most one part per sample."
            )
        return cls(number, count, number * num_samples // count, (number + 1) * num_samples // count)

    @classmethod
    def whole(cls, num_samples: int) -> IndexPart:
        """Every row: what an index without a ``part`` entry holds."""
        return cls(0, 1, 0, num_samples)

    @classmethod
    def from_manifest(cls, manifest: dict) -> IndexPart:
        """The ``part`` entry of an index manifest (the whole store when it has none)."""
        entry = manifest.get(PART_KEY)
        if entry is None:
            return cls.whole(int(manifest["store"]["num_samples"]))
        return cls(int(entry["number"]), int(entry["count"]), int(entry["start"]), int(entry["stop"]))

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    @property
    def label(self) -> str:
        """``part I/N (rows a-b)``: how messages name a part."""
        return f"part {self.number}/{self.count} (rows {self.start}-{self.stop})"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PartHits:
    """One part's answer to a search, in store rows.

    Attributes:
        scores: ``(n_query, k)`` float32 inner products ``<U(z), Q(z')>``, best first.
        rows: ``(n_query, k)`` int64 store rows (the part's ``start`` + its own row).
        note: how the part filled queries its approximate index found short (``None``: none were).
    """

    scores: np.ndarray
    rows: np.ndarray
    note: str | None = None


def check_cover(method: str, parts: Sequence[tuple[str, IndexPart]], num_samples: int) -> list[int]:
    """Check that ``parts`` (``(where, part)``: a folder or URL and its part) cover every store row once.

    Args:
        method: the method they index (named in messages).
        parts: every part given for that method.
        num_samples: the store's rows.

    Returns:
        The positions of ``parts`` in row order.

    Raises:
        ConfigError: parts of different splits, a part given twice, a missing part, or parts whose
            rows overlap or leave a gap (each named with where it came from).
    """
    counts = sorted({part.count for _, part in parts})
    if len(counts) > 1:
        listed = ", ".join(f"{where} is part {part.number}/{part.count}" for where, part in parts)
        raise ConfigError(
            f"the {method} index parts come from different splits ({listed}); give the parts of one "
            "`retrac build --part I/N` split."
        )
    count = counts[0]
    seen: dict[int, str] = {}
    for where, part in parts:
        if part.number in seen:
            raise ConfigError(
                f"{part.label} of the {method} index is given twice ({seen[part.number]} and {where}); give "
                "each part once."
            )
        seen[part.number] = where
    missing = [number for number in range(count) if number not in seen]
    if missing:
        wanted = IndexPart.of((missing[0], count), num_samples)
        raise ConfigError(
            f"{wanted.label} of the {method} index is missing ({len(missing)} of {count} parts missing); give "
            f"every part of the split (built with `retrac build --part {missing[0]}/{count}`)."
        )
    order = sorted(range(len(parts)), key=lambda i: parts[i][1].start)
    expected = 0
    for i in order:
        where, part = parts[i]
        if part.start != expected:
            problem = (
                "overlaps the part before it"
                if part.start < expected
                else f"leaves rows {expected}-{part.start} out"
            )
            raise ConfigError(
                f"{part.label} of the {method} index ({where}) {problem}; rebuild the parts with one "
                "`retrac build --part I/N` split of this store."
            )
        expected = part.stop
    if expected != num_samples:
        raise ConfigError(
            f"the {method} index parts cover rows 0-{expected} of the store's {num_samples}; rebuild the parts "
            "of this store with `retrac build --part I/N`."
        )
    return order
