"""Fundus photograph preprocessing in numpy, shared by training and serving.

decode -> field-of-view crop -> pad to square -> resize -> [illumination normalisation] -> normalise.
The constants (image size, mean, std, illumination) come from the model config at training time and from
the bundle at serving time, never from code, so training and serving always prepare a photograph alike.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MAX_PIXELS = 60_000_000
"""Pillow's decompression-bomb limit used here: a 60 MP image is larger than any fundus camera's."""

MAX_ASPECT_RATIO = 4.0
"""Longest side / shortest side. Fundus cameras make 1:1 to 16:9 frames (wide-field montages about 2:1);
a thin strip is no photograph, and the pixel limit alone would not bound it (1 x 50,000 is 50 k pixels,
but padded to a square it would be 2.5 G)."""

MAX_WORK_SIDE = 4096
"""Before padding to a square, a photograph whose longer side is more than this (or twice the model's
input side, if that is more) is reduced by a whole factor (box filter), so the square never holds more than
about 4096^2 pixels. Every fundus camera's frame is below it, so their photographs are prepared exactly as
before; only oversized uploads take the shortcut."""

FOV_THRESHOLD = 0.08
"""Field of view: pixels brighter than this share of the image's 99th-percentile intensity."""


Illumination = Literal["none", "local-contrast"]
"""`none`: the photograph as it is. `local-contrast`: each pixel minus the Gaussian-blurred background
around it (Graham's Kaggle DR preprocessing), which removes vignetting, uneven exposure and colour casts
and keeps lesion-sized detail."""

ILLUMINATION_SIGMA = 1 / 30
"""The background blur's sigma as a share of the image side (Graham used radius/30 of a ~500 px eye)."""
ILLUMINATION_GAIN = 4.0
"""How strongly the local contrast is amplified around mid-grey."""
FOV_EDGE_MARGIN = 0.03
"""Share of the side trimmed inside the field-of-view edge, where the blur mixes in the black border."""


class ImageDecodeError(ValueError):
    """The bytes are not a photograph this system can read (format, truncation, size, mode)."""


class ImageSpec(BaseModel):
    """How a photograph becomes the image tower's input: a square RGB image of `size` pixels (after the
    field-of-view crop when `crop_fov`), optionally illumination-normalised, then normalised by mean/std.

    The one definition of it: the model config holds it (`vision.image`), the bundle's manifest carries it
    (`image`), and training and serving both prepare photographs with it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(gt=0)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop_fov: bool = True
    illumination: Illumination = "none"


def decode_image(
    data: bytes | Path, max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect_ratio: float = MAX_ASPECT_RATIO
) -> Image.Image:
    """Decode JPEG/PNG/TIFF bytes (or a file) to an RGB image, honouring EXIF orientation.

    Greyscale, CMYK, palette and 16-bit images are converted to 8-bit RGB. Raises ImageDecodeError with
    a readable reason for anything else: not an image, truncated, more than `max_pixels` pixels, or a
    frame longer than `max_aspect_ratio` times its width (checked from the header, before any decoding).
    """
    raw = Path(data).read_bytes() if isinstance(data, Path) else data
    try:
        with Image.open(io.BytesIO(raw)) as opened:
            if opened.format not in {"JPEG", "PNG", "TIFF", "MPO"}:
                raise ImageDecodeError(f"unsupported image format {opened.format}; send JPEG, PNG or TIFF")
            width, height = opened.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} pixels, more than the limit of {max_pixels:,} pixels"
                )
            if min(width, height) < 1 or max(width, height) > max_aspect_ratio * min(width, height):
                raise ImageDecodeError(
                    f"image is {width}x{height} pixels: no fundus camera makes that shape (the longer side may "
                    f"be at most {max_aspect_ratio:g} times the shorter)"
                )
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"image is too large to decode safely ({error})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not a readable image (expected JPEG, PNG or TIFF)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageDecodeError(f"image could not be decoded: {error}") from None
    return _to_rgb8(image)


def _to_rgb8(image: Image.Image) -> Image.Image:
    if image.mode in {"I;16", "I;16B", "I;16L", "I"}:
        values = np.asarray(image, dtype=np.float64)
        peak = values.max() or 1.0
        image = Image.fromarray((values / peak * 255.0).astype(np.uint8), mode="L")
    return image.convert("RGB") if image.mode != "RGB" else image


def field_of_view_box(rgb: np.ndarray, threshold: float = FOV_THRESHOLD) -> tuple[int, int, int, int] | None:
    """Bounding box (left, top, right, bottom) of the circular field of view, or None when the image
    has no dark border to remove (the whole frame is retina, or the image is blank)."""
    intensity = rgb.astype(np.float32).max(axis=2)
    peak = float(np.percentile(intensity, 99))
    if peak <= 0:
        return None
    mask = intensity > threshold * peak
    rows = np.flatnonzero(mask.mean(axis=1) > 0.02)
    cols = np.flatnonzero(mask.mean(axis=0) > 0.02)
    if rows.size == 0 or cols.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def crop_to_square(image: Image.Image, crop_fov: bool = True, max_side: int | None = None) -> Image.Image:
    """Crop the black border around the field of view, then pad with black to a centred square.

    With `max_side`, an image whose longer side is more than that is first reduced by a whole factor (box
    filter) so that it is not: the padding then never allocates more than about max_side^2 pixels."""
    if max_side is not None and max(image.size) > max_side:
        image = image.reduce(-(-max(image.size) // max_side))
    if crop_fov:
        # The border is found on a small thumbnail (fast on 5 MP photographs), then scaled back.
        scale = max(1, max(image.size) // 256)
        thumbnail = image.reduce(scale) if scale > 1 else image
        box = field_of_view_box(np.asarray(thumbnail))
        if box is not None:
            left, top, right, bottom = (v * scale for v in box)
            image = image.crop((left, top, min(right, image.width), min(bottom, image.height)))
    width, height = image.size
    side = max(width, height)
    if width == height:
        return image
    square = Image.new("RGB", (side, side))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def normalise_illumination(rgb: np.ndarray) -> np.ndarray:
    """Local-contrast normalisation of a square uint8 (S, S, 3) fundus image, as uint8.

    out = 128 + gain * (pixel - its Gaussian-blurred background). Outside the field of view, and in a
    thin ring inside its edge where the blur mixes in the black border, the output is mid-grey (128).
    """
    side = rgb.shape[0]
    image = Image.fromarray(rgb)
    background = np.asarray(image.filter(ImageFilter.GaussianBlur(radius=max(1.0, side * ILLUMINATION_SIGMA))))
    contrast = 128.0 + ILLUMINATION_GAIN * (rgb.astype(np.float32) - background.astype(np.float32))
    out = np.clip(np.rint(contrast), 0, 255).astype(np.uint8)
    out[~_field_of_view_mask(rgb)] = 128
    return out


def _field_of_view_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels inside the field of view, eroded by FOV_EDGE_MARGIN of the side."""
    intensity = rgb.max(axis=2)
    peak = float(np.percentile(intensity, 99))
    if peak <= 0:
        return np.zeros(intensity.shape, dtype=bool)
    margin = max(1, round(rgb.shape[0] * FOV_EDGE_MARGIN))
    # Padded with "outside" so that the erosion also trims where the cropped retina touches the frame.
    inside = np.pad(intensity > FOV_THRESHOLD * peak, margin, constant_values=False)
    # Erosion as "the box around the pixel is (almost) all inside": a box blur is far cheaper than MinFilter.
    mean = Image.fromarray(inside.astype(np.uint8) * 255).filter(ImageFilter.BoxBlur(margin))
    return np.asarray(mean)[margin:-margin, margin:-margin] >= 250


def model_pixels(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """An RGB image -> uint8 (size, size, 3) before mean/std: FOV crop, square, resize, illumination.

    Training stores these arrays; serving normalises them at once (`to_model_input`)."""
    square = crop_to_square(image, spec.crop_fov, max_side=max(MAX_WORK_SIDE, 2 * spec.size))
    resized = np.asarray(square.resize((spec.size, spec.size), Image.Resampling.BICUBIC, reducing_gap=2.0))
    return normalise_illumination(resized) if spec.illumination == "local-contrast" else resized


def to_model_input(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """An RGB image -> float32 array (3, size, size): `model_pixels`, then mean/std normalisation."""
    pixels = model_pixels(image, spec).astype(np.float32) / 255.0
    pixels = (pixels - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def batch_model_inputs(images: Sequence[Image.Image], spec: ImageSpec) -> np.ndarray:
    """Stack several images into one float32 batch (B, 3, size, size)."""
    return np.stack([to_model_input(image, spec) for image in images]) if images else np.zeros(
        (0, 3, spec.size, spec.size), dtype=np.float32
    )
