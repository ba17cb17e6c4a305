"""Index parts on other machines: the client of a ``retrac serve --search-only`` part server.

docs/design.md section 6, "Parts". A part server loads index parts (checked as the ``Attributor``
checks a local index: seal, digests, method re-derived against the store) and answers

* ``GET /parts``: ``{"format": "retrac-parts", "version": 1, "parts": [{"method", "manifest",
  "exact"}], "limits": {"max_k", "max_queries"}}`` (each part's sealed manifest);
* ``POST /search``: JSON ``{"method", "queries": (n, D) floats, "k", "opponents", "ef_search"}`` ->
  ``{"method", "k", "rows": (n, k) store rows, "scores": (n, k), "note"}``: the part's top-k of
  query vectors ``Q(z')`` computed by the front (the kernel already folded in), best first, with the
  store's row numbers. Floats travel as JSON numbers, which carry a float32 exactly;
* ``GET /parts/{method}/kernel.npz``: the part's ``kernel.npz`` (a kernel method's front folds it into
  the query; checked here against the manifest's sha256).

:class:`RemoteIndexPart` makes one such part look like a local one to the merging index
(``retrac.query.parts.PartedIndex``). The front trusts a part server's provenance check (it re-derived
the method from the part's rows and the store); it checks the manifest's seal and its store and
checkpoints itself.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np

from retrac.errors import DataError, IndexDamagedError
from retrac.query.partition import IndexPart, PartHits
from retrac.query.provenance import KERNEL_FILENAME, Kernel, kernel_from_arrays

PARTS_FORMAT = "retrac-parts"
PARTS_FORMAT_VERSION = 1
REMOTE_TIMEOUT_S = 300.0  # a search of a large part on a loaded machine


def is_remote(source: Any) -> bool:
    """Whether an ``--index`` names a part server (``http://`` or ``https://``) rather than a folder."""
    return str(source).startswith(("http://", "https://"))


class PartServer:
    """A connection to one part server (``retrac serve --search-only``).

    Raises (every method):
        DataError: the server cannot be reached, or answers with an error (its message is named).
    """

    def __init__(self, url: str, timeout_s: float = REMOTE_TIMEOUT_S) -> None:
        import httpx

        self.url = str(url).rstrip("/")
        self._client = httpx.Client(base_url=self.url, timeout=timeout_s)
        self._listing: dict | None = None

    def _request(self, method: str, path: str, **kwargs):
        import httpx

        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            reason = str(error) or type(error).__name__
            raise DataError(
                f"index part server {self.url} cannot be reached ({reason}); start it there (retrac serve "
                "--search-only --index PART) or fix the URL."
            ) from None
        if response.status_code != 200:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text[:200]
            raise DataError(f"index part server {self.url} answered {response.status_code}: {detail}")
        return response

    def listing(self) -> dict:
        """``GET /parts``: the parts this server holds (cached)."""
        if self._listing is None:
            response = self._request("GET", "/parts")
            try:
                listing = response.json()
            except ValueError:  # not JSON: not a part server
                listing = None
            if not isinstance(listing, dict) or listing.get("format") != PARTS_FORMAT:
                raise DataError(
                    f"{self.url} is not a retrac index part server (GET /parts); start one with retrac serve "
                    "--search-only --index PART."
                )
            if listing.get("version") != PARTS_FORMAT_VERSION:
                raise DataError(
                    f"index part server {self.url} speaks {PARTS_FORMAT} version {listing.get('version')}, this "
                    f"retrac version {PARTS_FORMAT_VERSION}; run the same retrac on the front and the parts."
                )
            self._listing = listing
        return self._listing

    def search(
        self, method: str, queries: np.ndarray, k: int, opponents: bool, ef_search: int | None
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``POST /search`` in requests of at most the server's ``max_queries`` queries.

        Returns:
            ``scores (n, k)`` float32, ``rows (n, k)`` int64 store rows, and the server's notes.
        """
        step = int(self.listing()["limits"]["max_queries"])
        scores, rows, notes = [], [], []
        for start in range(0, queries.shape[0], step):
            body = {
                "method": method,
                "queries": queries[start : start + step].tolist(),  # float32 -> float: exact
                "k": int(k),
                "opponents": bool(opponents),
                "ef_search": ef_search,
            }
            answer = self._request("POST", "/search", json=body).json()
            scores.append(np.asarray(answer["scores"], dtype=np.float32).reshape(-1, k))
            rows.append(np.asarray(answer["rows"], dtype=np.int64).reshape(-1, k))
            notes += [answer["note"]] if answer.get("note") else []
        return np.concatenate(scores), np.concatenate(rows), notes

    def kernel(self, method: str, manifest: dict) -> Kernel:
        """The part's ``kernel.npz``, checked against the sha256 its sealed manifest records."""
        data = self._request("GET", f"/parts/{method}/{KERNEL_FILENAME}").content
        recorded = (manifest.get("digests") or {}).get(KERNEL_FILENAME) or {}
        if hashlib.sha256(data).hexdigest() != recorded.get("sha256"):
            raise IndexDamagedError(
                f"the {KERNEL_FILENAME} of the {method} part at {self.url} does not match the sha256 its manifest "
                "records; rebuild that part (retrac build --part I/N)."
            )
        with np.load(io.BytesIO(data)) as arrays:
            return kernel_from_arrays(arrays)

    def close(self) -> None:
        self._client.close()


class RemoteIndexPart:
    """One index part held by a part server, searched like a local part (store rows returned).

    Args:
        server: the server's connection.
        entry: its ``GET /parts`` entry for one method (``method``, ``manifest``, ``exact``).
    """

    def __init__(self, server: PartServer, entry: dict) -> None:
        self.server = server
        self.manifest: dict = entry["manifest"]
        self.method_name: str = self.manifest["method"]["name"]
        self.part = IndexPart.from_manifest(self.manifest)
        self.where = f"{server.url} ({self.method_name})"
        self.exact = bool(entry.get("exact"))
        self.num_vectors = int(self.manifest["num_vectors"])
        self.dim = int(self.manifest["dim"])
        self.kind, self.factory = self.manifest["kind"], self.manifest["factory"]
        self.recall = self.manifest.get("recall")
        self.search_params = dict(self.manifest.get("search_params") or {})

    def find(
        self, queries: np.ndarray, k: int, opponents: bool = False, ef_search: int | None = None
    ) -> PartHits:
        """The part's top ``k`` of each query, with store rows (the server's notes joined)."""
        scores, rows, notes = self.server.search(self.method_name, queries, k, opponents, ef_search)
        return PartHits(scores, rows, " ".join(notes) or None)

    def kernel(self) -> Kernel:
        return self.server.kernel(self.method_name, self.manifest)
