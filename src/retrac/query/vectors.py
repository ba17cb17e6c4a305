"""Train and query vectors of every method, and the TRAK / D-TRAK kernel (docs/design.md section 1).

Per checkpoint ``k``, from features ``phi_k(z, e)`` (``(n, S, d)``) and norms ``n_k(z, e)`` (``(n, S)``):

* TracIn train vector: ``u_k(z) = mean_e phi_k(z, e)``
* ReTrac train vector: ``u_k(z) = mean_e phi_k(z, e) / n_k(z, e)``

Query events: ``T_q`` timesteps ``tau_j`` x ``M`` noise draws; ``g_kj = mean_m P_k grad f(theta_k; z', tau_j, eps_jm)``:

* TracIn query vector: ``q_k(z') = mean_j g_kj(z')``
* ReTrac query vector: ``q_k(z') = mean_j g_kj(z') / ||g_kj(z')||``
* kernel (an option on either): ``q_k <- (Phi_k^T Phi_k + lambda_k I)^-1 q_k`` with
  ``lambda_k = c * mean_z ||u_k(z)||^2``.

Score: ``I(z, z') = sum_k w_k <u_k(z), q_k(z')>`` = ``<U(z), Q(z')>`` with
``U(z) = concat_k(w_k u_k(z))`` and ``Q(z') = concat_k(q_k(z'))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from retrac.errors import ConfigError, GradientError, StoreMismatchError

VECTOR_KINDS = ("tracin", "retrac")
KERNEL_PRESETS = ("trak", "dtrak")  # tracin + kernel on a loss / l1 store, on a sqnorm store
KERNEL_SUFFIX = "+kernel"
RETRAC_KERNEL = "retrac" + KERNEL_SUFFIX  # ReTrac's normalised vectors with the TRAK kernel
METHOD_NAMES = VECTOR_KINDS + (RETRAC_KERNEL,) + KERNEL_PRESETS
# The defaults follow the measured linear datamodeling score (README, "Attribution quality"): dtrak is
# the best measured and needs a store featurized with --objective sqnorm; on a loss / l1 store the
# default is the best of the methods that store serves. `retrac` stays available as the paper's method.
DEFAULT_METHOD = RETRAC_KERNEL
DEFAULT_SQNORM_METHOD = "dtrak"
DEFAULT_KERNEL_C = 0.1
LOSS_OBJECTIVES = ("loss", "l1")


def default_method(objective: str) -> str:
    """The default method for a store of ``objective``: ``dtrak`` on ``sqnorm``, else ``retrac+kernel``."""
    return DEFAULT_SQNORM_METHOD if objective == "sqnorm" else DEFAULT_METHOD


@dataclass(frozen=True)
class Method:
    """An attribution method: a vector kind plus an optional kernel.

    Presets (``Method.named``): ``tracin``, ``retrac`` (no kernel), ``retrac+kernel`` (the default),
    ``trak`` (``tracin`` + kernel on a ``loss`` / ``l1`` store) and ``dtrak`` (``tracin`` + kernel on a
    ``sqnorm`` store).

    Attributes:
        name: the preset name, or ``"<kind>+kernel"``.
        vectors: ``"tracin"`` or ``"retrac"``.
        kernel_c: ``c`` of ``lambda_k = c * mean ||u_k||^2``; ``None`` = no kernel.
    """

    name: str
    vectors: str
    kernel_c: float | None = None

    def __post_init__(self) -> None:
        if self.vectors not in VECTOR_KINDS:
            raise ConfigError(
                f"vector kind {self.vectors!r} is unknown; choose one of {', '.join(VECTOR_KINDS)}."
            )
        if self.kernel_c is not None and not 0 < self.kernel_c < float("inf"):
            raise ConfigError(
                f"kernel c={self.kernel_c} must be positive and finite (lambda_k = c * mean ||u_k||^2)."
            )

    @classmethod
    def named(cls, name: str, kernel: float | None = None) -> Method:
        """Resolve ``--method NAME [--kernel C]``.

        Args:
            name: ``tracin``, ``retrac``, ``retrac+kernel``, ``trak`` or ``dtrak``.
            kernel: ``c`` for the kernel; turns it on for ``tracin`` / ``retrac``, overrides the
                default ``0.1`` of ``retrac+kernel`` / ``trak`` / ``dtrak``.
        """
        if name == RETRAC_KERNEL:
            return cls(name, "retrac", DEFAULT_KERNEL_C if kernel is None else float(kernel))
        if name in KERNEL_PRESETS:
            return cls(name, "tracin", DEFAULT_KERNEL_C if kernel is None else float(kernel))
        if name in VECTOR_KINDS:
            if kernel is None:
                return cls(name, name, None)
            return cls(f"{name}+kernel", name, float(kernel))
        raise ConfigError(f"method {name!r} is unknown; choose one of {', '.join(METHOD_NAMES)}.")

    @property
    def uses_kernel(self) -> bool:
        return self.kernel_c is not None

    def check_objective(self, objective: str) -> None:
        """Refuse a store whose objective does not fit the method, naming the remedy."""
        if self.name == "dtrak" and objective != "sqnorm":
            raise StoreMismatchError(
                f"method dtrak needs a store featurized with --objective sqnorm (D-TRAK's measurement); this "
                f"store has objective {objective!r}: re-index with --objective sqnorm or use --method trak."
            )
        if self.name != "dtrak" and objective not in LOSS_OBJECTIVES:
            raise StoreMismatchError(
                f"method {self.name} needs a store featurized with --objective loss or l1; this store has "
                f"objective {objective!r}, D-TRAK's measurement: use --method dtrak, or re-index with --objective loss."
            )

    def to_dict(self) -> dict:
        return asdict(self)


def _check_norms(norms: np.ndarray, valid: np.ndarray, ids: Sequence[str] | None, what: str) -> None:
    bad = valid & ~(norms > 0)
    if bad.any():
        row, event = (int(i) for i in np.argwhere(bad)[0])
        name = ids[row] if ids is not None else str(row)
        raise GradientError(
            f"{what} {name!r} has a zero gradient norm at event {event}: ReTrac cannot normalise it; "
            "check the sample, or use --method tracin."
        )


def train_vectors(
    features: np.ndarray,
    norms: np.ndarray,
    kind: str,
    valid: np.ndarray | None = None,
    ids: Sequence[str] | None = None,
) -> np.ndarray:
    """Per-checkpoint train vectors ``u_k(z)`` of one block of samples.

    Args:
        features: ``(n, S, d)`` features ``phi_k(z, e)``.
        norms: ``(n, S)`` gradient norms ``n_k(z, e)``.
        kind: ``"tracin"`` or ``"retrac"``.
        valid: ``(n, S)`` bool mask of events that exist (replay schedules); default all.
        ids: sample ids for error messages.

    Returns:
        ``(n, d)`` float32 ``u_k(z)``. A sample with no event at this checkpoint (``replay``: not trained
        on in the checkpoint's interval) gets ``u_k(z) = 0``: it contributes nothing from that interval,
        as TracIn's sum over the training steps that used it says (docs/design.md section 1).
    """
    features = np.asarray(features, dtype=np.float32)
    n, s, _ = features.shape
    valid = np.ones((n, s), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    counts = np.maximum(valid.sum(axis=1), 1)  # no event: weights all 0, so u_k(z) = 0
    weights = valid.astype(np.float32)
    if kind == "retrac":
        _check_norms(norms, valid, ids, "sample")
        # ReTrac: u_k(z) = mean_e phi_k(z, e) / n_k(z, e)
        weights = weights / np.where(valid, norms, 1.0).astype(np.float32)
    elif kind != "tracin":
        raise ConfigError(f"vector kind {kind!r} is unknown; choose one of {', '.join(VECTOR_KINDS)}.")
    # TracIn: u_k(z) = mean_e phi_k(z, e)   (weights = 1 on valid events)
    return np.einsum("nsd,ns->nd", features, weights) / counts[:, None].astype(np.float32)


def query_vectors(features: np.ndarray, kind: str) -> np.ndarray:
    """Per-checkpoint query vectors ``q_k(z')`` from the projected gradients of the query events.

    Args:
        features: ``(n, T_q, M, d)``: ``P_k grad f(theta_k; z', tau_j, eps_jm)``.
        kind: ``"tracin"`` or ``"retrac"``.

    Returns:
        ``(n, d)`` float32 ``q_k(z')``.
    """
    g = np.asarray(features, dtype=np.float64).mean(axis=2)  # g_kj = mean_m P_k grad f(.; tau_j, eps_jm)
    if kind == "tracin":
        return g.mean(axis=1).astype(np.float32)  # TracIn: q_k = mean_j g_kj
    if kind != "retrac":
        raise ConfigError(f"vector kind {kind!r} is unknown; choose one of {', '.join(VECTOR_KINDS)}.")
    norms = np.linalg.norm(g, axis=2)  # ||g_kj||
    _check_norms(norms, np.ones_like(norms, dtype=bool), None, "query")
    return (g / norms[..., None]).mean(axis=1).astype(np.float32)  # ReTrac: mean_j g_kj / ||g_kj||


class KernelAccumulator:
    """Accumulates ``Phi_k^T Phi_k`` and ``sum ||u_k||^2`` over blocks of train vectors of one checkpoint."""

    def __init__(self, dim: int) -> None:
        self.gram = np.zeros((dim, dim), dtype=np.float64)
        self.sq_norm_sum = 0.0
        self.count = 0

    def add(self, u: np.ndarray) -> None:
        """Add a block ``(n, d)`` of (unweighted) train vectors ``u_k``."""
        u = np.asarray(u, dtype=np.float64)
        self.gram += u.T @ u
        self.sq_norm_sum += float((u * u).sum())
        self.count += u.shape[0]

    def preconditioner(self, c: float) -> tuple[np.ndarray, float]:
        """``((Phi_k^T Phi_k + lambda_k I)^-1, lambda_k)`` with ``lambda_k = c * mean_z ||u_k(z)||^2``."""
        lam = c * self.sq_norm_sum / max(1, self.count)
        if not lam > 0:
            raise GradientError(
                "all train vectors are zero: the kernel's lambda would be 0; check the store."
            )
        regularised = self.gram + lam * np.eye(self.gram.shape[0])
        return np.linalg.inv(regularised), lam
