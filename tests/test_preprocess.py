"""Fundus preprocessing on a real photograph (scikit-image ships one) and on bad inputs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from index.preprocess import (
    ImageDecodeError,
    ImageSpec,
    crop_to_square,
    decode_image,
    field_of_view_box,
    to_model_input,
)

SPEC = ImageSpec(size=224, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def retina() -> Image.Image:
    return Image.fromarray(skimage.data.retina())


def _encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_model_input_shape_and_normalisation(retina: Image.Image) -> None:
    pixels = to_model_input(retina, SPEC)
    assert pixels.shape == (3, 224, 224) and pixels.dtype == np.float32
    # Black border maps to (0 - 0.5) / 0.25 = -2; retina pixels are brighter.
    assert pixels.min() == pytest.approx(-2.0, abs=1e-3)
    assert pixels[0, 112, 112] > -1.5


def test_black_border_is_cropped_from_a_letterboxed_photo(retina: Image.Image) -> None:
    small = retina.resize((300, 300))
    framed = Image.new("RGB", (600, 400))
    framed.paste(small, (170, 50))  # wide black border, like a 4:3 camera frame
    left, top, right, bottom = field_of_view_box(np.asarray(framed))
    assert 160 <= left <= 185 and 40 <= top <= 65 and 455 <= right <= 480 and 335 <= bottom <= 360
    square = crop_to_square(framed)
    assert square.width == square.height and square.width < 330


def test_greyscale_cmyk_and_16_bit_are_converted(retina: Image.Image) -> None:
    grey = decode_image(_encode(retina.convert("L"), "PNG"))
    cmyk = decode_image(_encode(retina.convert("CMYK"), "JPEG"))
    sixteen = Image.fromarray(np.asarray(retina.convert("L"), dtype=np.uint16) * 257)
    converted = decode_image(_encode(sixteen, "PNG"))
    for image in (grey, cmyk, converted):
        assert image.mode == "RGB" and image.size == retina.size
    assert np.asarray(converted).max() == 255


def test_exif_orientation_is_honoured(retina: Image.Image) -> None:
    wide = retina.resize((200, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(_encode(wide, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (100, 200)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"%PDF-1.7 not an image", "not a readable image"),
        (b"", "not a readable image"),
        (b"GIF89a" + bytes(100), "not a readable image"),
    ],
)
def test_non_images_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(payload)


def test_truncated_jpeg_is_refused(retina: Image.Image) -> None:
    data = _encode(retina)
    with pytest.raises(ImageDecodeError, match="could not be decoded"):
        decode_image(data[: len(data) // 2])


def test_pixel_limit_refuses_oversized_images(retina: Image.Image) -> None:
    with pytest.raises(ImageDecodeError, match="more than the limit"):
        decode_image(_encode(retina, "PNG"), max_pixels=1_000_000)


def test_gif_is_refused_even_when_pillow_can_read_it(retina: Image.Image) -> None:
    with pytest.raises(ImageDecodeError, match="unsupported image format GIF"):
        decode_image(_encode(retina.resize((64, 64)), "GIF"))


@pytest.mark.shared_data
def test_every_real_eyepacs_photo_is_preprocessed(shared_data_dir: Path) -> None:
    photos = sorted((shared_data_dir / "eyepacs-sample" / "images").glob("*.jpg"))
    assert len(photos) == 130
    for path in photos:
        image = decode_image(path)
        rgb = np.asarray(image)
        left, top, right, bottom = field_of_view_box(rgb)
        # The field of view found must cover the visible retina: nearly every pixel clearly brighter than
        # the border (a simple intensity threshold) lies inside the box.
        visible = rgb.max(axis=2) > 40
        inside = visible[top:bottom, left:right].sum()
        assert inside >= 0.98 * visible.sum(), path.name
        pixels = to_model_input(image, SPEC)
        assert pixels.shape == (3, 224, 224) and np.isfinite(pixels).all(), path.name
