"""The one resize an image gets on its way in: shorter side to the size (bilinear), then centre-cropped.

Image folders are decoded this way (:mod:`search.data.imagefolder`) and the model server
prepares uploads this way (:mod:`search.serving.preprocess`), so a served model sees what it was
evaluated on. Pillow only: the server imports it without torch.
"""

from __future__ import annotations

from PIL import Image

__all__ = ["resize_centre_crop"]


def resize_centre_crop(image: Image.Image, size: int) -> Image.Image:
    """``image`` at ``size``×``size``: shorter side resized to ``size`` (bilinear), then centre-cropped."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    scale = size / min(width, height)
    new_w = max(size, round(width * scale))
    new_h = max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))
