"""Settings of an audit and what its numbers mean (written into every summary)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from retrac.errors import ConfigError
from retrac.query.attribution import DEFAULT_TOP_K

VERDICTS = ("copy", "near", "novel")
DISTANCE_MEANING = (
    "L2 distance over all C*H*W pixel values in [-1, 1] (sqrt of the sum of squared differences)"
)
RELATIVE_MEANING = "r = d_1 / mean_{j<=n} d_j over the n nearest distinct training images (Carlini et al. 2023, without alpha)"
SELF_INFLUENCE_MEANING = "SI(z) = sum_k w_k ||u_k(z)||^2, u_k the TracIn train vector of checkpoint k: the TracIn score of z on itself"


@dataclass
class AuditConfig:
    """Settings of an audit.

    Attributes:
        k: top proponents per method and image.
        num_neighbours: ``n`` of the relative distance (distinct training images; at least 2).
        copy_threshold: verdict ``copy`` when the relative distance is below it (default ``1/6``,
            ``ell <= 1/3`` in Carlini et al.'s ``alpha = 0.5`` scaling).
        near_threshold: verdict ``near`` when below it and not a copy (default ``1/2``).
        shown_neighbours: nearest training images kept per image in the records and the report.
        num_hot_spots: hot spots listed in the summary and the report.
        report_images: audited images shown in the HTML page (flagged ones first); all are in the JSONL.
    """

    k: int = DEFAULT_TOP_K
    num_neighbours: int = 50
    copy_threshold: float = 1 / 6
    near_threshold: float = 0.5
    shown_neighbours: int = 5
    num_hot_spots: int = 20
    report_images: int = 300

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k={self.k}: ask for at least one proponent.")
        if self.num_neighbours < 2:
            raise ConfigError(
                f"num_neighbours n={self.num_neighbours}: the relative distance needs n >= 2 (default 50)."
            )
        if not 0 < self.copy_threshold <= self.near_threshold:
            raise ConfigError(
                f"thresholds copy={self.copy_threshold}, near={self.near_threshold}: need 0 < copy <= near."
            )
        if self.shown_neighbours < 1 or self.num_hot_spots < 1 or self.report_images < 0:
            raise ConfigError("shown_neighbours and num_hot_spots must be >= 1, report_images >= 0.")

    @property
    def thresholds(self) -> dict[str, float]:
        return {"copy": self.copy_threshold, "near": self.near_threshold}

    def to_dict(self) -> dict:
        return asdict(self)
