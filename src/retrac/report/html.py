"""Building blocks of retrac's HTML reports: PNG thumbnails, image cells, pages."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from retrac._io import atomic_write_text, atomic_write_via

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 4px 6px; vertical-align: top; text-align: center; }
th { background: #f4f4f4; }
.cell { display: inline-block; margin: 2px; font-size: 0.72em; }
.cell img { display: block; image-rendering: pixelated; border: 1px solid #bbb; }
.method { font-weight: 600; }
.note { color: #555; font-size: 0.9em; max-width: 60em; }
.flag { background: #fde2e1; }
"""


def pil_image(image: Tensor | np.ndarray):
    """One image ``(C, H, W)`` in ``[-1, 1]`` as an 8-bit PIL image (grayscale, or its first 3 channels)."""
    from PIL import Image

    array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    array = ((np.clip(array, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    array = array[0] if array.shape[0] == 1 else np.moveaxis(array[:3], 0, -1)
    return Image.fromarray(array)


def save_png(image: Tensor | np.ndarray, path: str | Path, size: int = 64) -> Path:
    """Write one image ``(C, H, W)`` in ``[-1, 1]`` as a PNG scaled (nearest) to ``size`` pixels high."""
    from PIL import Image

    picture = pil_image(image)
    scale = max(1, size // picture.height)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return atomic_write_via(path, lambda temporary: picture.save(temporary, format="PNG"))


def image_cell(src: str, caption_lines: Sequence[str], css_class: str = "cell") -> str:
    """An image with caption lines under it (``src`` relative to the page)."""
    caption = "<br>".join(html.escape(line) for line in caption_lines)
    return f'<div class="{css_class}"><img src="{html.escape(src)}" alt="{html.escape(caption_lines[0] if caption_lines else "")}">{caption}</div>'


def page(title: str, body: str) -> str:
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


def write_page(path: str | Path, title: str, body: str) -> Path:
    """Write an HTML page atomically."""
    return atomic_write_text(path, page(title, body))


class TrainThumbnails:
    """PNG thumbnails of training images, each written once, named ``images/train-ROW.png`` in ``out_dir``.

    Calling it with a training row returns the image's ``src`` relative to the page.
    """

    def __init__(self, train_images: Tensor, images_dir: str | Path) -> None:
        self.train_images = train_images
        self.images_dir = Path(images_dir)
        self._written: set[int] = set()

    def __call__(self, row: int) -> str:
        name = f"train-{row}.png"
        if row not in self._written:
            save_png(self.train_images[row], self.images_dir / name)
            self._written.add(row)
        return f"images/{name}"
