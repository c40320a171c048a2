"""How well the occlusion heatmap (`index.explain`) points at the lesions a synthetic photograph shows.

The pointing game on a synthetic archive's DR photographs (ICDR >= 1 with at least one DR lesion drawn,
per `synth_inventory.jsonl`): a photograph is a hit when its heatmap's peak, mapped back to photograph
pixels, lies within a drawn DR lesion's radius plus a tolerance (POINTING_TOLERANCE_PX at 512 px, scaled
with the photograph's side). Two baselines are scored by the same rule: a random point of the field of view
(its expected hit rate: the share of field-of-view pixels that would hit) and the field of view's centre.
The latency is the wall time of each explanation (median and 95th percentile), beside the CPU it ran on.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from index.cpus import available_cpus, cpu_model
from index.embedder import Embedder
from index.explain import Explanation, explain_photograph, field_mask, overlay
from index.preprocess import decode_image
from training.synth.archive import PHOTO_FOLDER, read_inventory, read_synth_manifest
from training.synth.lesions import DR_LESIONS

POINTING_TOLERANCE_PX = 15.0
"""Tolerance of a hit at a 512-pixel photograph (scaled with the side: 6.6 px at 224)."""
REFERENCE_SIDE = 512


class ExplainEvalError(ValueError):
    """The archive cannot be evaluated (no inventory, or one written before lesion positions were recorded)."""


@dataclass(frozen=True)
class PhotographScore:
    """One DR photograph: its grades, where the heatmap points, and whether it and the baselines hit."""

    image_id: str
    icdr: int
    predicted: int
    target_grade: int
    target_probability: float
    max_drop: float
    peak_xy: tuple[float, float]
    distance: float
    """From the peak to the nearest drawn DR lesion's edge (its radius), pixels; <= tolerance is a hit."""
    hit: bool
    centre_hit: bool
    random_hit_rate: float
    lesions: int
    seconds: float


@dataclass
class PointingReport:
    """The pointing game over an archive's DR photographs, its baselines and the latency."""

    archive: str
    bundle: str
    window: int
    stride: int
    tolerance_px: float
    photograph_side: int
    scores: list[PhotographScore] = field(default_factory=list)
    cpu: str = ""
    threads: int = 0

    def summary(self) -> dict[str, object]:
        """The figures: pointing game, baselines, by ICDR grade, latency."""
        n = len(self.scores)
        seconds = sorted(s.seconds for s in self.scores)
        by_grade: dict[str, dict[str, float | int]] = {}
        for grade in sorted({s.icdr for s in self.scores}):
            group = [s for s in self.scores if s.icdr == grade]
            by_grade[str(grade)] = {
                "photographs": len(group),
                "pointing_game": _share([s.hit for s in group]),
                "random_point": round(float(np.mean([s.random_hit_rate for s in group])), 4),
                "centre": _share([s.centre_hit for s in group]),
            }
        detected = [s for s in self.scores if s.predicted >= 1]
        return {
            "photographs": n,
            "pointing_game": _share([s.hit for s in self.scores]),
            "pointing_game_ci95": _wilson([s.hit for s in self.scores]),
            "pointing_game_detected": _share([s.hit for s in detected]),
            "detected": len(detected),
            "random_point": round(float(np.mean([s.random_hit_rate for s in self.scores])), 4) if n else None,
            "centre": _share([s.centre_hit for s in self.scores]),
            "by_icdr": by_grade,
            "latency_ms_median": round(1000 * statistics.median(seconds), 1) if n else None,
            "latency_ms_p95": round(1000 * seconds[min(n - 1, math.ceil(0.95 * n) - 1)], 1) if n else None,
            "occlusion": {"window": self.window, "stride": self.stride},
            "tolerance_px": round(self.tolerance_px, 2),
            "photograph_side": self.photograph_side,
            "cpu": self.cpu,
            "threads": self.threads,
        }

    def to_json(self) -> dict[str, object]:
        """The summary and every photograph's score."""
        return {"archive": self.archive, "bundle": self.bundle, "summary": self.summary(),
                "photographs": [s.__dict__ for s in self.scores]}


def _share(flags: Sequence[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def _wilson(flags: Sequence[bool], z: float = 1.96) -> list[float] | None:
    """Wilson 95% interval of a share."""
    n = len(flags)
    if n == 0:
        return None
    p = sum(flags) / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(centre - half, 4), round(centre + half, 4)]


def dr_photographs(archive: Path) -> list[dict]:
    """The inventory lines of the archive's DR photographs: ICDR >= 1 and at least one DR lesion drawn.
    Raises ExplainEvalError for an archive without an inventory or without lesion positions."""
    try:
        lines = read_inventory(archive)
    except FileNotFoundError:
        raise ExplainEvalError(f"{archive}: no synth_inventory.jsonl (not a synthetic archive)") from None
    if lines and all(line.get("lesions") is None for line in lines):
        raise ExplainEvalError(f"{archive}: its inventory has no lesion positions (written by an older version): "
                               "render it again with `retina-train synth`")
    return [
        line for line in lines
        if (line.get("dr_icdr") or 0) >= 1 and any(les["kind"] in DR_LESIONS for les in line.get("lesions") or [])
    ]


def distance_to_lesions(x: float, y: float, lesions: Sequence[dict]) -> float:
    """From (x, y) to the nearest DR lesion's circle (0 or less: inside it), pixels."""
    return min(math.hypot(x - les["x"], y - les["y"]) - les["r"] for les in lesions if les["kind"] in DR_LESIONS)


def hit_share_of_field(rgb: np.ndarray, lesions: Sequence[dict], tolerance: float) -> float:
    """The share of the photograph's field-of-view pixels within a DR lesion's radius plus `tolerance`:
    the expected hit rate of a uniformly random point of the field."""
    mask = field_mask(rgb)
    if not mask.any():
        return 0.0
    ys, xs = np.mgrid[0 : rgb.shape[0], 0 : rgb.shape[1]]
    near = np.zeros(mask.shape, bool)
    for les in lesions:
        if les["kind"] in DR_LESIONS:
            near |= np.hypot(xs + 0.5 - les["x"], ys + 0.5 - les["y"]) <= les["r"] + tolerance
    return float((near & mask).sum() / mask.sum())


def evaluate_pointing(
    bundle: Path,
    archive: Path,
    n: int | None = 200,
    window: int | None = None,
    stride: int | None = None,
    threads: int | None = None,
    overlays: Path | None = None,
    overlay_count: int = 12,
    on_photograph: Callable[[PhotographScore], None] | None = None,
) -> PointingReport:
    """Play the pointing game on at most `n` DR photographs of `archive` (in archive order) with the
    bundle's graphs on ONNX Runtime (CPU, `threads` threads). With `overlays`, also write the first
    `overlay_count` photographs with their heatmap, peak and drawn lesions as PNGs for a person to look at."""
    archive, bundle = Path(archive), Path(bundle)
    lines = dr_photographs(archive)[: n if n is not None else None]
    embedder = Embedder(bundle, device="cpu", threads=threads)
    side = int(read_synth_manifest(archive).get("size") or 0)
    report = PointingReport(archive=str(archive), bundle=str(bundle), window=0, stride=0, tolerance_px=0.0,
                            photograph_side=side, cpu=cpu_model(), threads=threads or available_cpus())
    if overlays is not None:
        overlays.mkdir(parents=True, exist_ok=True)
    for i, line in enumerate(lines):
        image = decode_image(archive / PHOTO_FOLDER / f"{line['image_id']}.jpg")
        side = side or max(image.size)
        tolerance = POINTING_TOLERANCE_PX * max(image.size) / REFERENCE_SIDE
        explanation = explain_photograph(embedder, image, window=window, stride=stride)
        report.window, report.stride, report.tolerance_px = explanation.window, explanation.stride, tolerance
        report.photograph_side = side
        lesions = [les for les in line["lesions"] if les["kind"] in DR_LESIONS]
        x, y = explanation.peak_xy
        distance = distance_to_lesions(x, y, lesions)
        left, top, right, bottom = explanation.field_of_view_box
        centre_distance = distance_to_lesions((left + right) / 2, (top + bottom) / 2, lesions)
        score = PhotographScore(
            image_id=line["image_id"], icdr=int(line["dr_icdr"]), predicted=explanation.icdr_grade,
            target_grade=explanation.target_grade, target_probability=round(explanation.target_probability, 4),
            max_drop=round(explanation.max_drop, 4), peak_xy=(round(x, 1), round(y, 1)),
            distance=round(distance, 2), hit=distance <= tolerance, centre_hit=centre_distance <= tolerance,
            random_hit_rate=round(hit_share_of_field(np.asarray(image), lesions, tolerance), 4),
            lesions=len(lesions), seconds=round(explanation.seconds, 4),
        )
        report.scores.append(score)
        if overlays is not None and i < overlay_count:
            overlay_with_lesions(image, explanation, lesions, score).save(overlays / f"{line['image_id']}.png")
        if on_photograph is not None:
            on_photograph(score)
    return report


def overlay_with_lesions(
    image: Image.Image, explanation: Explanation, lesions: Sequence[dict], score: PhotographScore, scale: int = 2
) -> Image.Image:
    """The heatmap overlay (`index.explain.overlay`) beside the photograph with its drawn DR lesions ringed
    in green, enlarged `scale` times, captioned with the grades and whether the peak hit."""
    heat = overlay(image, explanation)
    marked = image.convert("RGB").copy()
    draw = ImageDraw.Draw(marked)
    for les in lesions:
        r = les["r"] + 1
        draw.ellipse((les["x"] - r, les["y"] - r, les["x"] + r, les["y"] + r), outline=(0, 255, 0))
    x, y = explanation.peak_xy
    draw.line((x - 6, y, x + 6, y), fill=(0, 255, 255))
    draw.line((x, y - 6, x, y + 6), fill=(0, 255, 255))
    width, height = image.size
    sheet = Image.new("RGB", (2 * width, height + 14))
    sheet.paste(heat, (0, 14))
    sheet.paste(marked, (width, 14))
    caption = (f"{score.image_id} ICDR {score.icdr} predicted {score.predicted}  P(ICDR>={score.target_grade}) "
               f"{score.target_probability:.2f} max drop {score.max_drop:.2f}  {'HIT' if score.hit else 'miss'} "
               f"({score.distance:.1f} px)")
    ImageDraw.Draw(sheet).text((2, 1), caption, fill=(255, 255, 255))
    return sheet.resize((sheet.width * scale, sheet.height * scale), Image.Resampling.NEAREST)


def write_report(report: PointingReport, path: Path) -> None:
    """The report as JSON (summary first, then every photograph)."""
    payload = report.to_json()
    payload["python"] = platform.python_version()
    Path(path).write_text(json.dumps(payload, indent=1) + "\n")


def format_summary(summary: dict[str, object]) -> str:
    """The summary as a few lines of text."""
    lines = [
        f"DR photographs: {summary['photographs']} ({summary['detected']} predicted ICDR >= 1)",
        f"pointing game: {summary['pointing_game']} (95% CI {summary['pointing_game_ci95']}); on those predicted "
        f"DR: {summary['pointing_game_detected']}",
        f"baselines: random point of the field {summary['random_point']}, field centre {summary['centre']}",
        f"tolerance {summary['tolerance_px']} px at {summary['photograph_side']} px; occlusion {summary['occlusion']}",
    ]
    for grade, figures in summary["by_icdr"].items():  # type: ignore[union-attr]
        lines.append(f"  ICDR {grade}: {figures['photographs']} photographs, pointing {figures['pointing_game']}, "
                     f"random {figures['random_point']}, centre {figures['centre']}")
    lines.append(f"latency per photograph: median {summary['latency_ms_median']} ms, "
                 f"p95 {summary['latency_ms_p95']} ms ({summary['cpu']}, {summary['threads']} thread(s))")
    return "\n".join(lines)
