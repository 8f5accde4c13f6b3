"""Reading one image file as RGB uint8, whatever its mode, or saying exactly why it cannot be read.

Every loader in effnet.data goes through `read_rgb`, so a grayscale scan, a transparent PNG, a 16-bit
TIFF and a CMYK JPEG all reach the model as the same kind of array. Conversion rules:

* grayscale (L, 1) and palette (P) images become RGB by repeating / looking up the colours;
* an alpha channel (RGBA, LA, PA, palette transparency) is *composited onto white*, the way image
  viewers show transparency; plain dropping would expose whatever colour hides under transparent
  pixels (often black or garbage);
* 16-bit images (I;16, I;16B, I) are scaled from 0..65535 to 0..255 (divided by 257). Pillow's own
  `convert("L")` clips them at 255, turning most 16-bit photos white;
* float images (F) are taken as 0..1 when their maximum is at most 1, else as 0..255;
* CMYK and YCbCr use Pillow's conversion; EXIF orientation is applied, so phone photos stand upright.

Anything that does not decode (not an image, truncated, corrupt, zero-sized) raises `BadImageError` with
the path and a one-line reason, so callers can collect every bad file before training starts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# torchvision's ImageFolder extensions (lower case); other files in class folders are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
VALIDATION_DECODE_SIZE = 64


class BadImageError(Exception):
    """A file that cannot be used as an image: `path` and a human `reason`."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def is_image_file(path: str | Path) -> bool:
    name = Path(path).name
    # Dot files include macOS "._photo.jpg" resource forks, which are not images.
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB by the rules in the module docstring."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(_to_uint8(values / 257.0)).convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        return Image.fromarray(_to_uint8(np.nan_to_num(values) * scale)).convert("RGB")
    return image.convert("RGB")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def read_rgb(path: str | Path, min_side: int | None = None) -> np.ndarray:
    """Decode `path` to an HxWx3 uint8 array, or raise BadImageError saying why not.

    With `min_side`, a JPEG at least twice that size is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
    scaling, a clean downscale) keeping both sides >= min_side: a 12 MP photo then costs 19 instead of
    51 CPU ms, and whatever the model's resolution it is resized further down anyway.
    """
    return _decode(path, reduce_to=min_side)[0]


def check_image(path: str | Path) -> tuple[int, int]:
    """Decode `path` fully but cheaply and return its (height, width), or raise BadImageError.

    JPEGs are decoded with libjpeg's DCT scaling (about 1/8 of the pixels): a truncated or corrupt
    file still fails, at a fraction of the cost, which makes validating big folders up front affordable.
    """
    return _decode(path, reduce_to=VALIDATION_DECODE_SIZE)[1]


def _decode(path: str | Path, reduce_to: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    try:
        with Image.open(path) as image:
            size = (image.height, image.width)
            if reduce_to is not None:
                image.draft("RGB", (reduce_to, reduce_to))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            array = np.asarray(to_rgb(image))
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image (Pillow cannot identify the format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise BadImageError(path, f"corrupt or truncated image ({type(error).__name__}: {error})") from None
    if array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise BadImageError(path, f"unusable image of shape {array.shape}")
    return array, size
