"""Where a feature store lives: a local folder or an object-storage prefix (docs/design.md section 5).

``--out`` / ``--store`` accept a path or a URL:

* a path, or ``file:///abs/path``: a local folder (:class:`LocalLocation`);
* ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``memory://name``: an object-storage prefix
  (:class:`ObjectLocation`) through obstore and zarr v3's own ``zarr.storage.ObjectStore``.

Why obstore rather than fsspec (s3fs / gcsfs): the ledger and the claims of work stealing need an
*atomic create* (a PUT that fails when the object exists); obstore exposes it on every backend as
``put(..., mode="create")`` (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``, an exclusive
create locally and in memory), with one dependency (a Rust wheel, no aiobotocore) and a store zarr
wraps directly. Credentials and endpoints come from the usual environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``,
``AWS_ALLOW_HTTP=true`` for a local server; ``GOOGLE_SERVICE_ACCOUNT`` ...).

Both locations offer the same small key-value interface over ``/``-separated keys relative to the
store's root: :meth:`read_text`, :meth:`write_text` (whole and atomic: a rename locally, one PUT on
object storage), :meth:`create_text` (atomic create-if-absent), :meth:`delete`, :meth:`list` and
:meth:`zarr_store`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import uuid
from pathlib import Path

from retrac._io import atomic_write_text
from retrac.errors import ConfigError, DataError

OBJECT_SCHEMES = ("s3", "gs", "memory")
URL_SCHEMES = ("file", *OBJECT_SCHEMES)
RETRY_CONFIG = {  # fail within seconds on an unreachable endpoint, retry transient errors a few times
    "max_retries": 3,
    "backoff": {
        "init_backoff": datetime.timedelta(milliseconds=100),
        "max_backoff": datetime.timedelta(seconds=2),
        "base": 2,
    },
    "retry_timeout": datetime.timedelta(seconds=20),
}
_MEMORY_STORES: dict[str, object] = {}  # memory:// URLs live as long as the process


def is_url(target: str | os.PathLike) -> bool:
    """Whether ``target`` is a URL with a scheme retrac reads (``file``, ``s3``, ``gs``, ``memory``)."""
    scheme, sep, _ = str(target).partition("://")
    return bool(sep) and scheme in URL_SCHEMES


class LocalLocation:
    """A store in a local folder. Keys are paths relative to it."""

    is_local = True

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.url = str(self.path)

    def file(self, key: str) -> Path:
        return self.path / key

    def read_text(self, key: str) -> str | None:
        """The text of ``key``, or ``None`` when it does not exist."""
        try:
            return self.file(key).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def write_text(self, key: str, text: str) -> None:
        """Write ``key`` whole (temporary file, then one rename)."""
        atomic_write_text(self.file(key), text)

    def create_text(self, key: str, text: str) -> bool:
        """Create ``key`` with ``text`` unless it exists; ``True`` when this call created it.

        Atomic: the text is written to a temporary file which is then hard-linked to ``key``
        (``link`` fails when ``key`` exists), so a reader never sees a half-written file.
        """
        target = self.file(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(text, encoding="utf-8")
        try:
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        self.file(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        """Names of the objects directly inside folder ``prefix`` (no temporary files)."""
        folder = self.file(prefix)
        if not folder.is_dir():
            return []
        return sorted(f.name for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))

    def exists(self, key: str) -> bool:
        return self.file(key).is_file()

    def zarr_store(self, read_only: bool):
        from zarr.storage import LocalStore

        return LocalStore(self.path, read_only=read_only)

    def __str__(self) -> str:
        return self.url


class ObjectLocation:
    """A store under an object-storage prefix (``s3://``, ``gs://``, ``memory://``) through obstore.

    A whole-object PUT is atomic, so :meth:`write_text` needs no rename; :meth:`create_text` is a
    conditional PUT (``mode="create"``: S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``).
    """

    is_local = False
    path = None

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.store = _object_store(self.url)

    def read_text(self, key: str) -> str | None:
        import obstore

        try:
            return bytes(self._call(obstore.get, key).bytes()).decode("utf-8")
        except FileNotFoundError:
            return None

    def write_text(self, key: str, text: str) -> None:
        import obstore

        self._call(obstore.put, key, text.encode("utf-8"))

    def create_text(self, key: str, text: str) -> bool:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            self._call(obstore.put, key, text.encode("utf-8"), mode="create")
            return True
        except (AlreadyExistsError, PreconditionError):
            return False

    def delete(self, key: str) -> None:
        import obstore

        with contextlib.suppress(FileNotFoundError):
            self._call(obstore.delete, key)

    def list(self, prefix: str) -> list[str]:
        import obstore

        listing = self._call(obstore.list_with_delimiter, prefix.rstrip("/") + "/")
        return sorted(item["path"].rpartition("/")[2] for item in listing["objects"])

    def exists(self, key: str) -> bool:
        import obstore

        try:
            self._call(obstore.head, key)
            return True
        except FileNotFoundError:
            return False

    def zarr_store(self, read_only: bool):
        from zarr.storage import ObjectStore

        return ObjectStore(self.store, read_only=read_only)

    def _call(self, function, key: str, *args, **kwargs):
        """``function(store, key, ...)``; a network or permission failure becomes a one-line ``DataError``."""
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            return function(self.store, key, *args, **kwargs)
        except (FileNotFoundError, AlreadyExistsError, PreconditionError):
            raise
        except Exception as exc:  # obstore's GenericError, PermissionDeniedError, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(
                f"store {self.url!r}: {key} cannot be accessed ({type(exc).__name__}: {first[:300]}); check the "
                "URL, the endpoint (AWS_ENDPOINT_URL) and the credentials, then rerun."
            ) from None

    def __str__(self) -> str:
        return self.url


def _object_store(url: str):
    """The obstore store of an ``s3://``, ``gs://`` or ``memory://`` URL (configured from the environment)."""
    try:
        from obstore.store import MemoryStore, from_url
    except ImportError:  # pragma: no cover - obstore is a dependency
        raise ConfigError(f"{url!r}: object storage needs obstore; pip install obstore.") from None
    scheme = url.partition("://")[0]
    if scheme == "memory":
        return _MEMORY_STORES.setdefault(url, MemoryStore())
    try:
        return from_url(url, retry_config=RETRY_CONFIG)
    except Exception as exc:
        raise ConfigError(f"store URL {url!r} cannot be used ({type(exc).__name__}: {exc}).") from None


def open_location(target: str | os.PathLike) -> LocalLocation | ObjectLocation:
    """The location of a store given as a path or a URL (``file://``, ``s3://``, ``gs://``, ``memory://``).

    Raises:
        ConfigError: a URL of another scheme (``http://`` ...), or one obstore cannot configure.
    """
    if isinstance(target, (LocalLocation, ObjectLocation)):
        return target
    text = str(target)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return LocalLocation(text)
    if scheme == "file":
        return LocalLocation(rest if rest.startswith("/") else "/" + rest)
    if scheme in OBJECT_SCHEMES:
        return ObjectLocation(text)
    raise ConfigError(
        f"store {text!r}: the scheme {scheme!r} is not supported; give a path or a file://, s3://, gs:// or "
        "memory:// URL."
    )
