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
    model_pixels,
    normalise_illumination,
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


def _fov_halves(rgb: np.ndarray) -> tuple[float, float]:
    """Mean brightness of the left and right thirds of the central band (well inside the field of view)."""
    side = rgb.shape[0]
    band = rgb[side * 2 // 5 : side * 3 // 5].astype(np.float64).mean(axis=2)
    return band[:, side // 6 : side // 3].mean(), band[:, side * 2 // 3 : side * 5 // 6].mean()


def test_local_contrast_removes_an_exposure_gradient(retina: Image.Image) -> None:
    # The same eye photographed evenly and under an exposure falling from 100% on the right to 35% on the left.
    rgb = np.asarray(retina, dtype=np.float32)
    ramp = np.linspace(0.35, 1.0, rgb.shape[1], dtype=np.float32)[None, :, None]
    uneven = Image.fromarray(np.clip(rgb * ramp, 0, 255).astype(np.uint8))
    local = ImageSpec(size=224, mean=SPEC.mean, std=SPEC.std, illumination="local-contrast")

    def left_minus_right(image: Image.Image, spec: ImageSpec) -> float:
        left, right = _fov_halves(model_pixels(image, spec))
        return left - right

    assert model_pixels(uneven, local).shape == (224, 224, 3) and model_pixels(uneven, local).dtype == np.uint8
    raw_shift = left_minus_right(retina, SPEC) - left_minus_right(uneven, SPEC)
    flat_shift = left_minus_right(retina, local) - left_minus_right(uneven, local)
    assert raw_shift > 40 and abs(flat_shift) < 5
    assert abs(_fov_halves(model_pixels(uneven, local))[0] - 128) < 10
    # Vessels stay visible: local contrast keeps detail at their scale.
    assert model_pixels(uneven, local)[60:170, 40:190].std() > 10


def test_local_contrast_is_mid_grey_outside_the_field_of_view(retina: Image.Image) -> None:
    square = model_pixels(retina, SPEC)
    flat = normalise_illumination(square)
    assert (flat[:4, :4] == 128).all() and (flat[-4:, -4:] == 128).all()  # corners: black border before
    assert (flat[112, :3] == 128).all()  # the thin ring at the FOV edge is neutral, not a bright halo
    assert (normalise_illumination(np.zeros((32, 32, 3), np.uint8)) == 128).all()
    pixels = to_model_input(retina, ImageSpec(size=224, mean=SPEC.mean, std=SPEC.std, illumination="local-contrast"))
    assert pixels[:, 0, 0] == pytest.approx([(128 / 255 - 0.5) / 0.25] * 3, abs=1e-5)


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
        flat = model_pixels(image, ImageSpec(size=224, mean=SPEC.mean, std=SPEC.std, illumination="local-contrast"))
        centre = flat[84:140, 84:140].astype(np.float64)
        # Under- or over-exposed, the photograph's centre comes out near mid-grey with detail kept.
        assert abs(centre.mean() - 128) < 25 and centre.std() > 2, path.name
