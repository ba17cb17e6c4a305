"""Uploaded files -> image tensors, and image tensors -> PNG bytes, for ``retrac serve``.

Uploads are decoded the way ``retrac query --images`` reads files (``retrac.data``): a PNG or JPEG
in a grayscale mode becomes one channel, any other mode RGB; ``uint8`` pixels are scaled by
``x / 127.5 - 1``; a ``.npy`` array is ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` (one more
form here: a single ``(H, W)`` image), ``uint8`` or float already in ``[-1, 1]``. Sizes are checked
before pixels are decoded. Whether the images fit the model is checked afterwards by the task.
"""

from __future__ import annotations

import io

import numpy as np
from numpy.lib import format as npy_format
from torch import Tensor

from retrac.data import images_from_array
from retrac.errors import DataError
from retrac.report.html import pil_image

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
NPY_MAGIC = b"\x93NUMPY"
GRAY_MODES = ("L", "LA", "I", "I;16", "1")


class UnsupportedUploadError(DataError):
    """An uploaded file is not a PNG, a JPEG or a ``.npy`` array (HTTP 415)."""


class UploadTooLargeError(DataError):
    """A request body, an image or a number of images above the server's limits (HTTP 413)."""


def upload_kind(content: bytes) -> str:
    """``"png"``, ``"jpeg"`` or ``"npy"`` from the first bytes of a file, or ``""``."""
    if content.startswith(PNG_MAGIC):
        return "png"
    if content.startswith(JPEG_MAGIC):
        return "jpeg"
    if content.startswith(NPY_MAGIC):
        return "npy"
    return ""


def decode_upload(name: str, content: bytes, max_side: int) -> tuple[Tensor, list[str]]:
    """Decode one uploaded file.

    Args:
        name: the file name the client sent (used for ids and messages).
        content: the file's bytes.
        max_side: the largest width / height accepted.

    Returns:
        ``(images, ids)``: ``(n, C, H, W)`` float32 (range not yet checked) and one id per image
        (``name``, or ``name[i]`` for the rows of a multi-image ``.npy``).

    Raises:
        UnsupportedUploadError: not a PNG, JPEG or ``.npy`` file.
        UploadTooLargeError: an image side above ``max_side``.
        DataError: a damaged file, a pickled or non-numeric array, a shape that is not an image.
    """
    kind = upload_kind(content)
    if not kind:
        raise UnsupportedUploadError(
            f"file {name!r} is not a PNG, JPEG or .npy array (its first bytes are {content[:8]!r}); "
            "upload an image or an array saved with numpy.save."
        )
    if kind == "npy":
        array = _read_npy(name, content, max_side)
        if array.ndim == 2:
            array = array[None]
        images = images_from_array(array, name)
        ids = [name] if images.shape[0] == 1 else [f"{name}[{i}]" for i in range(images.shape[0])]
        return images, ids
    return images_from_array(_read_picture(name, content, max_side)[None], name), [name]


def _check_side(name: str, height: int, width: int, max_side: int) -> None:
    if height > max_side or width > max_side:
        raise UploadTooLargeError(
            f"{name!r} is {width}x{height} pixels; this server takes images up to {max_side} pixels a side "
            "(--max-image-side), and the model takes its own training size."
        )


def _read_picture(name: str, content: bytes, max_side: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(content)) as img:  # reads the header only
            _check_side(name, img.height, img.width, max_side)
            gray = img.mode in GRAY_MODES
            return np.asarray(img.convert("L") if gray else img.convert("RGB"))
    except UploadTooLargeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"image {name!r} cannot be decoded ({exc}); upload a valid PNG or JPEG.") from None


def _read_npy(name: str, content: bytes, max_side: int) -> np.ndarray:
    stream = io.BytesIO(content)
    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = npy_format.read_array_header_2_0(stream)
        else:  # (3, 0): a utf-8 header numpy.save writes only for non-latin-1 field names
            raise ValueError(f"format version {version} is not supported here")
    except (ValueError, OSError, SyntaxError) as exc:
        raise DataError(f"{name!r} is not a readable .npy array ({exc}); save it with numpy.save.") from None
    if dtype.hasobject:
        raise DataError(f"{name!r} holds Python objects; upload a numeric array (uint8 or float in [-1, 1]).")
    if not 2 <= len(shape) <= 4:
        raise DataError(
            f"{name!r} has shape {shape}; upload (H, W), (N, H, W), (N, H, W, C) or (N, C, H, W) images."
        )
    spatial = shape[-2:] if len(shape) < 4 or shape[-1] not in (1, 3, 4) else shape[-3:-1]
    _check_side(name, int(spatial[0]), int(spatial[1]), max_side)
    try:
        return np.load(io.BytesIO(content), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{name!r} is a damaged .npy array ({exc}); save it again with numpy.save.") from None


def png_bytes(image: Tensor | np.ndarray, min_height: int = 64) -> bytes:
    """One ``(C, H, W)`` image in ``[-1, 1]`` as PNG bytes, scaled up (nearest) to ``min_height``."""
    from PIL import Image

    picture = pil_image(image)
    scale = max(1, -(-min_height // picture.height))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()
