"""The documented form of retrac's JSON documents, as pydantic models (docs/design.md section 10).

``json_schema(name)`` gives the JSON Schema of ``retrac.query``, ``retrac.audit`` (with
``retrac.audit.record``, one line of ``audit.jsonl``) and ``retrac.report``; ``validate_document``
checks a document against the form its ``schema`` field names, shapes included. Top-level fields are
closed (an unknown key is an error), so a field added to the output without being documented here
fails the tests.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, model_validator

from retrac.errors import DataError
from retrac.schema import AUDIT_SCHEMA, QUERY_SCHEMA, REPORT_SCHEMA, SCHEMA_VERSION

Id = StrictInt | StrictStr


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _Header(_Closed):
    schema_version: Literal[SCHEMA_VERSION] = Field(  # type: ignore[valid-type]
        description="changes when a field is removed, renamed or changes meaning"
    )


class MethodResult(_Closed):
    """The top-k of every query under one method (index)."""

    method: str = Field(description="tracin, retrac, trak, dtrak or <kind>+kernel")
    opponents: bool = Field(description="true: the most negative scores, ascending")
    k: int = Field(ge=1, description="results per query")
    indices: list[list[int]] = Field(description="(n_query, k) training rows of the store, best first")
    scores: list[list[float]] = Field(description="(n_query, k) I(z, z'); positive = proponent")
    ids: list[list[Id]] = Field(description="(n_query, k) training sample ids (the store's, strings)")
    thumbnails: list[list[str]] | None = Field(
        default=None, description="retrac serve only: (n_query, k) URLs of the training images"
    )
    search_note: str | None = Field(
        default=None,
        description="how an approximate index that found fewer than k rows for some queries was filled "
        "(a wider search, or exact search over its vectors); absent when it was not needed",
    )

    @model_validator(mode="after")
    def _shapes(self) -> MethodResult:
        for name in ("indices", "scores", "ids") + (("thumbnails",) if self.thumbnails is not None else ()):
            rows = getattr(self, name)
            if len(rows) != len(self.indices) or any(len(row) != self.k for row in rows):
                raise ValueError(f"{name} must be (n_query, k) = ({len(self.indices)}, {self.k})")
        return self


class QueryDocument(_Header):
    """``retrac query --json``, ``AttributionResult.to_dict()``, ``POST /attribute``."""

    schema_name: Literal["retrac.query"] = Field(alias="schema")
    score_meaning: str
    query_ids: list[Id] = Field(
        description="one per query: ints for .npy rows and integer .npz ids, else strings (file names)"
    )
    results: dict[str, MethodResult] = Field(description="method -> its result; one entry per index")
    query_image_urls: list[str] | None = Field(default=None, description="retrac serve only")

    @model_validator(mode="after")
    def _consistent(self) -> QueryDocument:
        if not self.results:
            raise ValueError("results must hold at least one method")
        for method, result in self.results.items():
            if result.method != method:
                raise ValueError(f"results[{method!r}] holds method {result.method!r}")
            if len(result.indices) != len(self.query_ids):
                raise ValueError(
                    f"results[{method!r}] has {len(result.indices)} rows for {len(self.query_ids)} queries"
                )
        return self


class Neighbour(_Closed):
    row: int
    id: Id
    distance: float
    duplicates: int = Field(description="training images with exactly these pixels (itself included)")


class Proponents(_Closed):
    rows: list[int]
    ids: list[Id]
    scores: list[float]
    nn_rank: int | None = Field(description="1-based rank of the nearest training image among them, or null")


class AuditRecord(_Closed):
    """One line of ``audit.jsonl``: one audited image."""

    image: int
    id: Id
    verdict: Literal["copy", "near", "novel"]
    relative_distance: float
    nn_distance: float
    mean_neighbour_distance: float
    num_neighbours: int
    thresholds: dict[Literal["copy", "near"], float]
    nearest_row: int
    nearest_id: Id
    nearest_duplicates: int
    nearest: list[Neighbour]
    proponents: dict[str, Proponents]


class HotSpot(_Closed):
    row: int
    id: Id
    duplicates: int
    outputs: int = Field(description="audited images for which it is the nearest or some method's top-1")
    as_nearest: int
    as_top1: dict[str, int]


class TrainingData(_Closed):
    source: str
    fingerprint: str
    num_samples: int
    num_distinct: int


class SelfInfluence(_Closed):
    rank: int
    row: int
    id: Id
    self_influence: float


class Audited(_Closed):
    source: str
    generated: int | None
    seed: int
    steps: int | None = Field(description="reverse sampling steps of --generate")


class AuditDocument(_Header):
    """``OUT/summary.json`` of ``retrac audit``, ``retrac audit --json``, ``AuditResult.to_dict()``."""

    schema_name: Literal["retrac.audit"] = Field(alias="schema")
    num_images: int
    verdict_counts: dict[Literal["copy", "near", "novel"], int]
    copy_rate: float
    flagged_rate: float
    thresholds: dict[Literal["copy", "near"], float]
    num_neighbours: int
    k: int
    report_images: int
    methods: list[str]
    nn_in_top_k: dict[str, float]
    nn_is_top1: dict[str, float]
    hot_spots: list[HotSpot]
    training_data: TrainingData
    meaning: dict[str, str]
    self_influence_top: list[SelfInfluence] | None = None
    self_influence_top_1_percent: int | None = None
    indexes: list[str] | None = Field(default=None, description="the index folders (retrac audit)")
    pixel_index: str | None = Field(default=None, description="the pixel-neighbour index folder")
    audited: Audited | None = None
    files: dict[str, str] | None = Field(default=None, description="written files by name (retrac audit)")


class ReportDocument(_Header):
    """``OUT/bias.json`` of ``retrac report``, ``retrac report --json``, ``BiasMeasurement.to_dict()``."""

    schema_name: Literal["retrac.report"] = Field(alias="schema")
    norm_timestep_spearman: float | None = Field(description="mean over checkpoints; null when undefined")
    norm_max_over_min: list[float | None]
    topk: dict[str, dict[str, Any]] = Field(
        description="method -> top-k statistics (see retrac.bias.TopkBias)"
    )
    influence_norm_spearman: dict[str, float | None]
    influence_timestep_spearman: dict[str, float | None]
    num_outliers: int


MODELS: dict[str, type[BaseModel]] = {
    QUERY_SCHEMA: QueryDocument,
    AUDIT_SCHEMA: AuditDocument,
    f"{AUDIT_SCHEMA}.record": AuditRecord,
    REPORT_SCHEMA: ReportDocument,
}


def json_schema(name: str) -> dict:
    """The JSON Schema of document ``name`` (``retrac.query``, ``retrac.audit``, ``retrac.audit.record``,
    ``retrac.report``)."""
    if name not in MODELS:
        raise DataError(f"no schema {name!r}; one of {', '.join(MODELS)}.")
    return MODELS[name].model_json_schema(by_alias=True)


def validate_document(document: Any, name: str | None = None) -> BaseModel:
    """Check ``document`` against its documented form (``name``, default its ``schema`` field).

    Raises:
        DataError: not a retrac document, another schema version, or fields that do not fit (named).
    """
    if name is None:
        name = document.get("schema") if isinstance(document, dict) else None
    if name not in MODELS:
        raise DataError(f"not a retrac JSON document: schema {name!r}; expected one of {', '.join(MODELS)}.")
    try:
        return MODELS[name].model_validate(document, strict=False)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()[:5])
        raise DataError(
            f"document does not fit schema {name!r} version {SCHEMA_VERSION}: {problems}."
        ) from None
