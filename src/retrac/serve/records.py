"""What ``retrac serve`` keeps per request: its timing, the queries it remembers, the key that
identifies a query (image, label, prompt) and the URLs of images."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
from torch import Tensor


@dataclass
class Timing:
    """Seconds one request spent waiting for and computing gradients, and searching."""

    queued_s: float = 0.0
    gradients_s: float = 0.0
    search_s: float = 0.0
    batch_images: int = 0
    cached_images: int = 0

    def server_timing(self) -> str:
        """The ``Server-Timing`` header value (milliseconds)."""
        return (
            f"queue;dur={self.queued_s * 1e3:.3f}, gradients;dur={self.gradients_s * 1e3:.3f}, "
            f"search;dur={self.search_s * 1e3:.3f}, "
            f'batch;desc="{self.batch_images} images, {self.cached_images} cached"'
        )


@dataclass
class RememberedQuery:
    """An answered query kept for "most influenced queries"."""

    key: str
    name: str
    image: Tensor  # (C, H, W)
    vectors: dict[str, np.ndarray]  # method -> (D,)


def image_key(image: Tensor, label: int | None, prompt: str | None = None) -> str:
    """sha256 of one image's float32 pixels, shape, label and prompt: the cache and history key."""
    digest = hashlib.sha256(str(tuple(image.shape)).encode())
    digest.update(np.ascontiguousarray(image.numpy(), dtype=np.float32).tobytes())
    digest.update(b"" if label is None else str(int(label)).encode())
    digest.update(b"" if prompt is None else b"prompt:" + prompt.encode())
    return digest.hexdigest()


def sample_image_url(sample_id: str) -> str:
    return f"/samples/{quote(sample_id, safe='')}/image.png"


def query_image_url(key: str) -> str:
    return f"/queries/{key[:24]}/image.png"
