"""Reading a user's image file the way the 28x28 training images were made.

MNIST digits are white on black, scaled to fit a 20x20 box and centred by their centre of mass in 28x28;
Fashion-MNIST items are white-ish on black, scaled to fill 28x28. Any photo or scan, of any size or colour,
goes through the same steps so that predict sees what training saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dlnotes.errors import UserError

MAX_PIXELS = 40_000_000  # a 40-megapixel photo is fine; a 20000x12000 PNG that is small on disk is refused


def open_image(path: str | Path, mode: str = "RGB"):
    """An image file as a PIL image in `mode` ("RGB", "L"), upright by its EXIF orientation. A missing file, a
    file too large to decode safely or one that does not decode is one clear error."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"Image {path} does not exist.")
    try:
        with Image.open(path) as opened:  # reads the header only: the size is known before any pixel is decoded
            width, height = opened.size
            if width * height > MAX_PIXELS:
                raise UserError(f"{path} is {width}x{height} pixels, more than the {MAX_PIXELS:,} accepted "
                                "(a small file can decode to gigabytes); scale it down first.")
            return ImageOps.exif_transpose(opened).convert(mode)
    except UserError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise UserError(f"Cannot read {path} as an image: {err}") from err
    except Exception as err:  # a truncated or malformed file fails inside whichever decoder PIL picked
        raise UserError(f"Cannot read {path} as an image ({type(err).__name__}: {err}).") from err


def read_image_like_mnist(path: str | Path, style: str = "digit") -> np.ndarray:
    """Return a (28, 28) uint8 image in the training data's convention. `style` is "digit" or "fashion"."""
    from PIL import Image

    image = open_image(path, "L")
    pixels = np.asarray(image, dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if border.mean() > 127:  # dark ink on light paper: flip to the dataset's light-on-dark
        pixels = 255 - pixels
    pixels -= pixels.min()
    if pixels.max() > 0:
        pixels *= 255 / pixels.max()
    ink = np.argwhere(pixels > 0.2 * 255)
    if len(ink) == 0:
        return np.zeros((28, 28), np.uint8)
    (top, left), (bottom, right) = ink.min(0), ink.max(0) + 1
    crop = Image.fromarray(pixels[top:bottom, left:right].astype(np.uint8))
    box = 20 if style == "digit" else 28
    scale = box / max(crop.size)
    crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))),
                       Image.Resampling.LANCZOS)
    canvas = np.zeros((28, 28), np.float32)
    small = np.asarray(crop, np.float32)
    if style == "digit":  # centre of mass at the centre, as in MNIST
        rows, cols = np.indices(small.shape)
        mass = small.sum()
        cy, cx = (rows * small).sum() / mass, (cols * small).sum() / mass
        y0, x0 = round(14 - cy), round(14 - cx)
    else:
        y0, x0 = (28 - small.shape[0]) // 2, (28 - small.shape[1]) // 2
    y0 = min(max(y0, 0), 28 - small.shape[0])
    x0 = min(max(x0, 0), 28 - small.shape[1])
    canvas[y0 : y0 + small.shape[0], x0 : x0 + small.shape[1]] = small
    return canvas.clip(0, 255).astype(np.uint8)
