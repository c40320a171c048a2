"""Where on a photograph the evidence for its grade lies: an occlusion heatmap from the bundle's graphs.

Gradient-free, so it needs only the exported ONNX graphs (no torch in the service): the photograph is
prepared as the bundle prepares it (`index.preprocess`), a square window slides over the model input, and
each occluded copy is graded by the image encoder and the grader (`Embedder.grade_pixels`, in batches).
Where hiding a region lowers the target probability most, the evidence lies.

Target: P(ICDR >= g) with g = max(1, the predicted ICDR grade). For a photograph graded g >= 1 that is the
probability the grade rests on (hiding what made it "at least g" lowers it), and a drop below the
threshold between g-1 and g is exactly what would lower the grade. For a photograph graded 0 it is
P(any DR): the map then shows what (little) pushes it towards DR, not what makes it healthy, since
"no lesion anywhere" has no location. The probabilities are those `/grade` reports (`Embedder.grade_pixels`
goes through the same grader, calibrated (temperatures, decision offsets) when the bundle has a calibration).

Heatmap: the model input is cut into cells of `stride` pixels; each cell gets the mean probability drop of
the windows that cover it (with the default stride of half a window, four windows), so the map is finer
than the window and a lesion shows where the windows that hide it overlap. The map is scaled to [0, 1]
by its largest positive drop (negative drops, where hiding a region raised the probability, are 0);
`max_drop` keeps the scale. Cells are mapped back onto the uploaded photograph through `square_box`:
the model input is the photograph's field-of-view crop padded to a centred square
(`index.preprocess.crop_to_square`), so the square can reach beyond the photograph where it was padded.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from index.embedder import Embedder
from index.preprocess import (
    FOV_THRESHOLD,
    MAX_WORK_SIDE,
    ImageSpec,
    field_of_view_box,
    model_pixels,
    normalise_illumination,
)

DEFAULT_WINDOW_SHARE = 3 / 28
"""Default window side as a share of the model input side (24 px at 224): a few lesion diameters, so that
hiding it removes a lesion or a small cluster, and small enough to say where on the retina it lies. Chosen
on a tuning archive (seed 7003), where it found more lesions than 32 px (pointing game 0.878 against 0.841)
at about twice the cost; README "Evidence heatmap"."""
DEFAULT_STRIDE_SHARE = 0.5
"""Default stride as a share of the window."""
BLUR_SHARE = 0.5
"""Sigma of the blur that fills a window, as a share of the window side."""
EDGE_MARGIN_SHARE = 0.03
"""A ring this wide (share of the side) inside the field of view's edge is never occluded: the model reacts
to any change of the rim (measured: with the rim blurred, a third of the peaks on a tuning archive fell on
the field's edge, where no lesion is drawn), and the renderer keeps lesions off it."""
MIN_WINDOW_SHARE, MAX_WINDOW_SHARE = 1 / 28, 1 / 2
"""Window bounds as shares of the model input side (8 to 112 px at 224)."""
MAX_OCCLUSIONS = 1024
"""Most occluded copies one explanation may grade (a stride of 1/4 window at the smallest window is 12,544
at 224 px; this bounds a request's cost to about 6 times the default's 169)."""


class ExplainError(ValueError):
    """Window or stride outside their bounds (a client's mistake)."""


@dataclass(frozen=True)
class Explanation:
    """An occlusion heatmap of one photograph and how to lay it on the photograph.

    Model-input pixels (`window`, `stride`, `input_size`) are those of the square the model sees; photograph
    pixels (`square_box`, `peak_xy`, `cell_centres`) those of the uploaded photograph (x right, y down).
    """

    heatmap: np.ndarray
    """(rows, cols) float32 in [0, 1]: each cell's probability drop over the largest (0 where none)."""
    drops: np.ndarray
    """(rows, cols) float32: each cell's mean drop of the target probability (negative: hiding it raised it)."""
    target_grade: int
    """g in the target P(ICDR >= g): max(1, the predicted ICDR grade)."""
    target_probability: float
    """P(ICDR >= g) of the photograph as it is."""
    icdr_probabilities: np.ndarray
    """(5,) ICDR probabilities of the photograph as it is (the photograph alone, as `/grade` sees it)."""
    sdrg_probabilities: np.ndarray
    """(5,) SDRG probabilities of the photograph as it is."""
    window: int
    stride: int
    input_size: int
    square_box: tuple[float, float, float, float]
    """(left, top, right, bottom) of the model input's square in photograph pixels (the field-of-view crop
    padded to a square; it may reach beyond the photograph where the square was padded)."""
    field_of_view_box: tuple[float, float, float, float]
    """(left, top, right, bottom) of the field-of-view crop in photograph pixels (the whole photograph when
    it has no dark border to crop)."""
    peak: tuple[int, int]
    """(row, col) of the cell with the largest drop."""
    peak_xy: tuple[float, float]
    """The peak cell's centre in photograph pixels."""
    occlusions: int
    """Occluded copies graded (windows wholly outside the occluded part of the field of view are skipped:
    hiding them changes nothing)."""
    seconds: float
    """Wall time of the whole explanation (preparing, occluding, grading)."""

    @property
    def max_drop(self) -> float:
        """The largest cell drop of the target probability (the heatmap's 1.0)."""
        return float(self.drops.max()) if self.drops.size else 0.0

    @property
    def icdr_grade(self) -> int:
        """The predicted ICDR grade of the photograph as it is."""
        return int(np.argmax(self.icdr_probabilities))

    def cell_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """(x of each column's centre, y of each row's centre) in photograph pixels."""
        return _cell_centres(self.heatmap.shape, self.stride, self.input_size, self.square_box)

    def to_photograph(self, u: float, v: float) -> tuple[float, float]:
        """A model-input point (u right, v down) -> photograph pixels."""
        left, top, right, _ = self.square_box
        scale = (right - left) / self.input_size
        return left + u * scale, top + v * scale


def default_window(size: int) -> int:
    """The default window side for a model input of `size` pixels (3/28 of it: 24 px at 224)."""
    return max(1, round(size * DEFAULT_WINDOW_SHARE))


def check_window(size: int, window: int | None, stride: int | None) -> tuple[int, int]:
    """(window, stride) for a model input of `size` pixels, defaults filled in. Raises ExplainError when the
    window is outside 1/28..1/2 of the side, the stride outside 1/4..1 window, or the grid would need more
    than MAX_OCCLUSIONS occluded copies."""
    low, high = max(2, math.ceil(size * MIN_WINDOW_SHARE)), max(2, math.floor(size * MAX_WINDOW_SHARE))
    window = default_window(size) if window is None else int(window)
    if not low <= window <= high:
        raise ExplainError(f"window must be {low} to {high} pixels of the {size}-pixel model input, not {window}")
    stride = max(1, round(window * DEFAULT_STRIDE_SHARE)) if stride is None else int(stride)
    if not max(1, math.ceil(window / 4)) <= stride <= window:
        raise ExplainError(f"stride must be {max(1, math.ceil(window / 4))} to {window} pixels (1/4 to 1 window), "
                           f"not {stride}")
    count = len(window_origins(size, window, stride)) ** 2
    if count > MAX_OCCLUSIONS:
        raise ExplainError(f"window {window} with stride {stride} needs {count} occluded copies, more than the "
                           f"limit of {MAX_OCCLUSIONS}: use a larger stride")
    return window, stride


def window_origins(size: int, window: int, stride: int) -> list[int]:
    """Where windows start along one side: every `stride` pixels, and one flush with the far edge."""
    origins = list(range(0, size - window + 1, stride))
    if origins[-1] != size - window:
        origins.append(size - window)
    return origins


def model_input_box(
    image: Image.Image, spec: ImageSpec
) -> tuple[tuple[float, float, float, float], tuple[float, float, float, float]]:
    """(square box, field-of-view box) of a photograph in its own pixels: where the model input's square
    lies on it, and the crop it was padded from. Mirrors `index.preprocess.crop_to_square` (including its
    reduction of oversized photographs), so `image.crop(square box)` resized to the model input is what
    `model_pixels` prepares (up to resampling)."""
    max_side = max(MAX_WORK_SIDE, 2 * spec.size)
    factor = -(-max(image.size) // max_side) if max(image.size) > max_side else 1
    work = image.reduce(factor) if factor > 1 else image
    left, top, right, bottom = 0, 0, work.width, work.height
    if spec.crop_fov:
        scale = max(1, max(work.size) // 256)
        thumbnail = work.reduce(scale) if scale > 1 else work
        box = field_of_view_box(np.asarray(thumbnail))
        if box is not None:
            left, top, right, bottom = (v * scale for v in box)
            right, bottom = min(right, work.width), min(bottom, work.height)
    width, height = right - left, bottom - top
    side = max(width, height)
    square_left, square_top = left - (side - width) // 2, top - (side - height) // 2
    square = (square_left, square_top, square_left + side, square_top + side)
    return (
        tuple(float(v * factor) for v in square),  # type: ignore[return-value]
        tuple(float(v * factor) for v in (left, top, right, bottom)),  # type: ignore[return-value]
    )


def field_mask(rgb: np.ndarray) -> np.ndarray:
    """(S, S) bool: pixels inside the field of view (brighter than FOV_THRESHOLD of the 99th percentile)."""
    intensity = rgb.max(axis=2).astype(np.float32)
    peak = float(np.percentile(intensity, 99))
    if peak <= 0:
        return np.zeros(intensity.shape, dtype=bool)
    return intensity > FOV_THRESHOLD * peak


def blurred_fill(rgb: np.ndarray, mask: np.ndarray, sigma: float, margin: int = 0) -> np.ndarray:
    """A heavily blurred copy of a prepared photograph (uint8 (S, S, 3)) to fill occluded windows with.

    Why blur and not black or grey: a black or grey square inside the retina is a shape the model never saw,
    and a dark blob is what a haemorrhage looks like, so the drop would measure the square's own effect. A
    blur wide enough (sigma half a window) erases lesion-sized detail (microaneurysms, haemorrhages,
    exudates, new vessels) and keeps the local background colour, illumination and vignetting, so an
    occluded copy is still a plausible fundus photograph, only without that region's detail. The blur is
    normalised within the field of view (blur(image x mask) / blur(mask)) so that windows at its edge are
    not darkened by the black border; outside the field, and `margin` pixels inside its edge (see
    EDGE_MARGIN_SHARE), the copy is the photograph itself.
    """
    radius = max(0.5, float(sigma))
    weights = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(radius))
    masked = Image.fromarray((rgb * mask[..., None]).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
    w = np.asarray(weights, dtype=np.float32)[..., None] / 255.0
    fill = np.asarray(masked, dtype=np.float32) / np.maximum(w, 1e-3)
    fill = np.clip(np.rint(fill), 0, 255).astype(np.uint8)
    inside = mask
    if margin > 0:
        eroded = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(2 * margin + 1))
        inside = np.asarray(eroded) > 0
    return np.where(inside[..., None], fill, rgb)


def explain_photograph(
    embedder: Embedder,
    image: Image.Image,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 32,
    target_grade: int | None = None,
) -> Explanation:
    """The occlusion heatmap of one photograph (an RGB PIL image, e.g. from `index.preprocess.decode_image`)
    for the target P(ICDR >= max(1, predicted grade)) (see the module docstring).

    `window` and `stride` are in model-input pixels (default: 3/28 of the side, stride half of it;
    bounds in `check_window`, which raises ExplainError). The occluded copies are graded in batches of
    `batch_size` through `embedder.grade_pixels`. `target_grade` (1-4) overrides g, e.g. 2 for the evidence of
    referable DR whatever the predicted grade."""
    started = time.perf_counter()
    spec = embedder.image_spec
    size = spec.size
    window, stride = check_window(size, window, stride)
    if target_grade is not None and not 1 <= target_grade <= len(embedder.manifest.icdr_names) - 1:
        raise ExplainError(f"target_grade must be 1 to {len(embedder.manifest.icdr_names) - 1}, not {target_grade}")
    square_box, fov_box = model_input_box(image, spec)
    # Occlusion happens on the resized square before any illumination normalisation, which then runs on
    # each occluded copy as it would on an upload.
    rgb = model_pixels(image, spec.model_copy(update={"illumination": "none"}))
    mask = field_mask(rgb)
    fill = blurred_fill(rgb, mask, BLUR_SHARE * window, margin=max(1, round(EDGE_MARGIN_SHARE * size)))
    changed = np.any(fill != rgb, axis=2)
    origins = window_origins(size, window, stride)
    boxes = [(y, x) for y in origins for x in origins if changed[y : y + window, x : x + window].any()]

    def prepared(pixels: np.ndarray) -> np.ndarray:
        if spec.illumination == "local-contrast":
            pixels = normalise_illumination(pixels)
        scaled = pixels.astype(np.float32) / 255.0
        scaled = (scaled - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
        return scaled.transpose(2, 0, 1)

    icdr0, sdrg0 = embedder.grade_pixels(prepared(rgb)[None])
    icdr0, sdrg0 = icdr0[0], sdrg0[0]
    target = max(1, int(np.argmax(icdr0))) if target_grade is None else int(target_grade)
    p0 = float(icdr0[target:].sum())
    probabilities = np.zeros(len(boxes), np.float32)
    for start in range(0, len(boxes), batch_size):
        batch = []
        for y, x in boxes[start : start + batch_size]:
            occluded = rgb.copy()
            occluded[y : y + window, x : x + window] = fill[y : y + window, x : x + window]
            batch.append(prepared(occluded))
        icdr, _ = embedder.grade_pixels(np.stack(batch), batch_size=batch_size)
        probabilities[start : start + len(batch)] = icdr[:, target:].sum(axis=1)
    drops = _cell_drops(changed, window, stride, boxes, p0 - probabilities)
    top = float(drops.max())
    heatmap = np.clip(drops / top, 0.0, 1.0) if top > 0 else np.zeros_like(drops)
    row, col = (int(v) for v in np.unravel_index(int(np.argmax(drops)), drops.shape))
    xs, ys = _cell_centres(drops.shape, stride, size, square_box)
    return Explanation(
        heatmap=heatmap.astype(np.float32), drops=drops.astype(np.float32), target_grade=target,
        target_probability=p0, icdr_probabilities=icdr0, sdrg_probabilities=sdrg0, window=window, stride=stride,
        input_size=size, square_box=square_box, field_of_view_box=fov_box, peak=(row, col),
        peak_xy=(float(xs[col]), float(ys[row])), occlusions=len(boxes), seconds=time.perf_counter() - started,
    )


def _cell_drops(
    changed: np.ndarray, window: int, stride: int, boxes: list[tuple[int, int]], drops: np.ndarray
) -> np.ndarray:
    """Cells of `stride` pixels: the mean over their pixels of each pixel's mean drop over the windows that
    changed it. A pixel that no occlusion changed (the black border, the rim kept by EDGE_MARGIN_SHARE)
    counts 0: the evidence of a window lies in what it hid, so a cell at the edge of the field is not
    credited with the whole drop of a window that reaches into the field from it."""
    size = changed.shape[0]
    weight = changed.astype(np.float64)
    total = np.zeros((size, size), np.float64)
    count = np.zeros((size, size), np.float64)
    for (y, x), drop in zip(boxes, drops, strict=True):
        total[y : y + window, x : x + window] += float(drop) * weight[y : y + window, x : x + window]
        count[y : y + window, x : x + window] += weight[y : y + window, x : x + window]
    per_pixel = np.where(count > 0, total / np.maximum(count, 1.0), 0.0)
    cells = math.ceil(size / stride)
    padded = np.zeros((cells * stride, cells * stride), np.float64)
    pixels = np.zeros_like(padded)
    padded[:size, :size] = per_pixel
    pixels[:size, :size] = 1.0
    sums = padded.reshape(cells, stride, cells, stride).sum(axis=(1, 3))
    return (sums / pixels.reshape(cells, stride, cells, stride).sum(axis=(1, 3))).astype(np.float32)


def _cell_centres(
    shape: tuple[int, ...], stride: int, size: int, square_box: tuple[float, float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """(x of each column's centre, y of each row's centre) in photograph pixels; the last cell may be cut
    by the model input's edge."""
    left, top, right, _ = square_box
    scale = (right - left) / size

    def centres(cells: int) -> np.ndarray:
        starts = np.arange(cells) * stride
        return (starts + np.minimum(starts + stride, size)) / 2.0 * scale

    return left + centres(shape[1]), top + centres(shape[0])


def overlay(image: Image.Image, explanation: Explanation, opacity: float = 0.55) -> Image.Image:
    """The photograph with the heatmap laid over it (transparent where 0, red to yellow as it rises) and a
    ring at the peak: for a person to look at."""
    from PIL import ImageDraw

    heat = np.asarray(explanation.heatmap, np.float32)
    left, top, right, bottom = explanation.square_box
    side = max(1, round(right - left))
    cells = Image.fromarray(np.clip(heat * 255, 0, 255).astype(np.uint8), "L")
    grid = explanation.stride * heat.shape[0]
    # Each cell covers `stride` model pixels; the last may be cut by the edge, so scale the grid, then crop.
    full = cells.resize((round(side * grid / explanation.input_size),) * 2, Image.Resampling.BILINEAR)
    full = full.crop((0, 0, side, side))
    values = np.asarray(full, np.float32) / 255.0
    colour = np.stack([np.full_like(values, 255), 255 * values, np.zeros_like(values)], axis=-1)
    layer = Image.fromarray(colour.astype(np.uint8), "RGB")
    alpha = Image.fromarray(np.clip(values * opacity * 255, 0, 255).astype(np.uint8), "L")
    out = image.convert("RGB").copy()
    out.paste(layer, (round(left), round(top)), alpha)
    draw = ImageDraw.Draw(out)
    x, y = explanation.peak_xy
    ring = max(3.0, explanation.stride * (right - left) / explanation.input_size / 2)
    draw.ellipse((x - ring, y - ring, x + ring, y + ring), outline=(0, 255, 255), width=max(1, round(ring / 6)))
    return out
