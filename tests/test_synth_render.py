"""The synthetic fundus renderer: lesions that obey the ICDR/SDRG grade rules, visible at 224 px, the
right laterality, determinism and basic photographic properties."""

from __future__ import annotations

import itertools
import json
from collections import deque

import numpy as np
import pytest
from PIL import Image, ImageFilter

from index.records import Assessment, Eye, FundusRecord
from training.synth.anatomy import build_anatomy
from training.synth.lesions import (
    COMPATIBLE_GRADES,
    DR_LESIONS,
    INTRARETINAL_HAEMORRHAGES,
    PROLIFERATIVE,
    QUADRANTS,
    LesionInventory,
    grades_compatible,
    plan_lesions,
    quadrant_of,
)
from training.synth.render import benchmark_render, fit_to_field, render_fundus

GRADES = (None, 0, 1, 2, 3, 4)
NPDR_KINDS = {
    "microaneurysm",
    "dot_haemorrhage",
    "blot_haemorrhage",
    "flame_haemorrhage",
    "hard_exudate",
    "cotton_wool_spot",
}


def record(**fields: object) -> FundusRecord:
    """A record with the given fields over a clean default (Canon, right eye, normal quality)."""
    values: dict[str, object] = {
        "image_id": "img1",
        "patient_id": "p1",
        "camera": "Canon CR",
        "exam_eye": Eye.RIGHT,
    }
    values.update(fields)
    return FundusRecord(**values)  # type: ignore[arg-type]


# -- grade rules --------------------------------------------------------------------------------


def haemorrhages_by_quadrant(inv: LesionInventory, with_microaneurysms: bool = False) -> dict[str, int]:
    kinds = INTRARETINAL_HAEMORRHAGES + (("microaneurysm",) if with_microaneurysms else ())
    return {q: sum(inv.in_quadrant(kind, q) for kind in kinds) for q in QUADRANTS}


def quadrants_with(inv: LesionInventory, kind: str) -> int:
    return sum(inv.in_quadrant(kind, q) > 0 for q in QUADRANTS)


def proliferative(inv: LesionInventory) -> bool:
    return any(inv.total(kind) > 0 for kind in PROLIFERATIVE)


def check_icdr(inv: LesionInventory, icdr: int) -> None:
    """Assert the lesions satisfy an ICDR grade."""
    present = set(inv.dr_lesions())
    if icdr == 0:
        assert not present
    elif icdr == 1:
        assert present == {"microaneurysm"}
        assert 2 <= inv.total("microaneurysm") <= 8
    elif icdr == 2:
        assert "microaneurysm" in present
        assert present - {"microaneurysm"}, "moderate NPDR needs more than microaneurysms"
        assert present <= NPDR_KINDS
        assert max(haemorrhages_by_quadrant(inv, with_microaneurysms=True).values()) < 20
    elif icdr == 3:
        assert not proliferative(inv)
        four = all(n > 20 for n in haemorrhages_by_quadrant(inv).values())
        two = quadrants_with(inv, "venous_beading") >= 2
        one = quadrants_with(inv, "irma") >= 1
        assert four or two or one, "severe NPDR must meet the 4-2-1 rule"
    else:
        assert proliferative(inv)


def check_sdrg(inv: LesionInventory, sdrg: int) -> None:
    """Assert the lesions satisfy an SDRG grade."""
    present = set(inv.dr_lesions())
    superior = inv.in_hemifield("blot_haemorrhage", "superior")
    inferior = inv.in_hemifield("blot_haemorrhage", "inferior")
    beading_or_irma = inv.total("venous_beading") + inv.total("irma") > 0
    if sdrg == 0:
        assert not present
    elif sdrg == 1:
        assert present
        assert superior < 4 and inferior < 4
        assert not beading_or_irma and not proliferative(inv)
    elif sdrg == 2:
        assert (superior >= 4) != (inferior >= 4), "R2 is >= 4 blots in exactly one hemi-field"
        assert not beading_or_irma and not proliferative(inv)
    elif sdrg == 3:
        assert (superior >= 4 and inferior >= 4) or beading_or_irma
        assert not proliferative(inv)
    else:
        assert proliferative(inv)


def check_grades(inv: LesionInventory, icdr: int | None, sdrg: int | None) -> None:
    """Assert an inventory against a record's grades: both when compatible, else ICDR with a conflict."""
    assert inv.grade_conflict == (not grades_compatible(icdr, sdrg))
    assert set(inv.counts) == set(inv.quadrant_counts)
    for kind in inv.counts:
        assert sum(inv.counts[kind].values()) == sum(inv.quadrant_counts[kind].values())
    if icdr is None and sdrg is None:
        assert not inv.dr_lesions()
        return
    if icdr is not None:
        check_icdr(inv, icdr)
    if sdrg is not None and not inv.grade_conflict:
        check_sdrg(inv, sdrg)


def test_compatible_pairs_are_exactly_the_documented_ones() -> None:
    compatible = {(i, s) for i in range(5) for s in range(5) if grades_compatible(i, s)}
    assert compatible == {(0, 0), (1, 1), (2, 1), (2, 2), (2, 3), (3, 2), (3, 3), (4, 4)}
    assert compatible == COMPATIBLE_GRADES
    assert all(grades_compatible(g, None) and grades_compatible(None, g) for g in GRADES)


@pytest.mark.parametrize(("icdr", "sdrg"), list(itertools.product(GRADES, GRADES)))
def test_plans_obey_the_grade_rules(icdr: int | None, sdrg: int | None) -> None:
    for seed in range(60):
        plan = plan_lesions(icdr, sdrg, np.random.default_rng(seed))
        inv = plan.inventory()
        check_grades(inv, icdr, sdrg)
        assert plan.grade_conflict == inv.grade_conflict
        assert (plan.icdr, plan.sdrg) in COMPATIBLE_GRADES
        if icdr is not None:
            assert plan.icdr == icdr


def test_every_route_to_severe_and_proliferative_is_used() -> None:
    routes: set[str] = set()
    for seed in range(200):
        inv = plan_lesions(3, 3, np.random.default_rng(seed)).inventory()
        if all(n > 20 for n in haemorrhages_by_quadrant(inv).values()):
            routes.add("4 quadrants of haemorrhages")
        if quadrants_with(inv, "venous_beading") >= 2:
            routes.add("beading")
        if inv.total("irma"):
            routes.add("irma")
        inv = plan_lesions(4, 4, np.random.default_rng(seed)).inventory()
        routes.update(kind for kind in PROLIFERATIVE if inv.total(kind))
    assert routes == {"4 quadrants of haemorrhages", "beading", "irma", *PROLIFERATIVE}


def test_lesions_lie_in_the_field_and_off_the_disc() -> None:
    for seed in range(40):
        plan = plan_lesions(4, 4, np.random.default_rng(seed))
        for les in plan.lesions:
            distance_to_disc = np.hypot(les.x - 0.66, les.y - 0.065)
            assert np.hypot(les.x - 0.04, les.y) <= 0.9 + 1e-9
            assert les.kind == "new_vessels_disc" or distance_to_disc >= 0.24


@pytest.mark.parametrize(
    ("icdr", "sdrg"), [(i, s) for i in GRADES for s in GRADES if (i, s) != (None, None)][::2]
)
def test_rendered_inventories_obey_the_grade_rules(icdr: int | None, sdrg: int | None) -> None:
    for seed in range(3):
        fields: dict[str, object] = {"dr_icdr": icdr, "dr_sdrg": sdrg}
        if seed == 1:  # an off-centre, cropped-looking field must not lose lesions or quadrants
            fields.update(image_field=Assessment.ABNORMAL, exam_eye=Eye.LEFT, camera="NIKON NF5050")
        _, inv = render_fundus(record(**fields), 128, np.random.default_rng(seed))
        check_grades(inv, icdr, sdrg)


def test_non_dr_findings_never_appear_as_dr_lesions() -> None:
    flags = {
        "macular_edema": True,
        "scar": True,
        "nevus": True,
        "amd": True,
        "vascular_occlusion": True,
        "hypertensive_retinopathy": True,
        "drusen": True,
        "hemorrhage": True,
        "retinal_detachment": True,
        "myopic_fundus": True,
        "increased_cup_disc": True,
        "other": True,
        "optic_disc": Assessment.ABNORMAL,
        "vessels": Assessment.ABNORMAL,
        "macula": Assessment.ABNORMAL,
    }
    for seed in range(4):
        _, inv = render_fundus(record(dr_icdr=0, dr_sdrg=0, **flags), 160, np.random.default_rng(seed))
        assert not inv.dr_lesions()
        for name in (
            "drusen",
            "nevus",
            "chorioretinal_scar",
            "vascular_occlusion_haemorrhage",
            "macular_edema_exudate",
        ):
            assert inv.total(name) > 0, name
        assert not set(inv.counts) & set(DR_LESIONS)
    _, inv = render_fundus(record(dr_icdr=0, dr_sdrg=0, hemorrhage=True), 160, np.random.default_rng(0))
    assert inv.total("hemorrhage_other") > 0 and not inv.dr_lesions()


def test_inventory_round_trips_through_json() -> None:
    _, inv = render_fundus(record(dr_icdr=3, dr_sdrg=3, drusen=True), 128, np.random.default_rng(5))
    again = LesionInventory.model_validate(json.loads(json.dumps(inv.model_dump())))
    assert again == inv
    assert inv.total("no_such_lesion") == 0


def test_fitting_keeps_quadrants_and_brings_lesions_into_the_field() -> None:
    rng = np.random.default_rng(0)
    for seed in range(10):
        anatomy = build_anatomy(record(image_field=Assessment.ABNORMAL), 256, np.random.default_rng(seed))
        points = rng.uniform(-0.9, 0.9, size=(300, 2))
        fitted = fit_to_field(anatomy, points, np.full(300, 0.03))
        assert all(quadrant_of(*a) == quadrant_of(*b) for a, b in zip(points, fitted, strict=True))
        assert anatomy.visible(fitted, margin=0.03).all()
        to_disc = np.hypot(fitted[:, 0] - anatomy.disc[0], fitted[:, 1] - anatomy.disc[1])
        assert (to_disc >= anatomy.disc_radius).all()


# -- pixels -------------------------------------------------------------------------------------


def components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean mask (small masks only)."""
    seen = np.zeros_like(mask, dtype=bool)
    found = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        found.append(pixels)
    return found


@pytest.mark.parametrize("seed", range(6))
def test_microaneurysms_are_visible_at_224_px(seed: int) -> None:
    eye = Eye.RIGHT if seed % 2 else Eye.LEFT
    camera = "Canon CR" if seed % 3 else "NIKON NF5050"
    clean, none = render_fundus(
        record(dr_icdr=0, dr_sdrg=0, exam_eye=eye, camera=camera), 224, np.random.default_rng(seed)
    )
    mild, inv = render_fundus(
        record(dr_icdr=1, dr_sdrg=1, exam_eye=eye, camera=camera), 224, np.random.default_rng(seed)
    )
    assert not none.dr_lesions() and inv.dr_lesions() == ["microaneurysm"]
    a = np.asarray(clean, dtype=int)
    b = np.asarray(mild, dtype=int)
    darker = (a - b).sum(axis=2)  # microaneurysms darken
    assert (b - a).max() <= 2, "lesions only darken; the background must be identical"
    blobs = components(darker > 25)
    assert 1 <= len(blobs) <= inv.total("microaneurysm")
    for blob in blobs:
        ys, xs = zip(*blob, strict=True)
        assert len(blob) >= 7, f"a microaneurysm covers only {len(blob)} px at 224 px"
        assert max(xs) - min(xs) + 1 >= 3 and max(ys) - min(ys) + 1 >= 3
    changed = np.abs(a - b).sum(axis=2) > 0
    assert changed.sum() <= sum(len(blob) for blob in blobs) * 3, "pixels changed away from the lesions"


@pytest.mark.parametrize("seed", range(8))
def test_disc_is_on_the_nasal_side_for_each_eye(seed: int) -> None:
    for eye, right_of_centre in ((Eye.RIGHT, True), (Eye.LEFT, False)):
        camera = "Canon CR" if seed % 2 else "NIKON NF5050"
        image, _ = render_fundus(
            record(exam_eye=eye, camera=camera, dr_icdr=0, dr_sdrg=0), 224, np.random.default_rng(seed)
        )
        luminance = np.asarray(image.convert("L").filter(ImageFilter.GaussianBlur(6)), dtype=float)
        y, x = np.unravel_index(np.argmax(luminance), luminance.shape)
        assert (x > 112) == right_of_centre, f"{eye.name}: brightest region at x={x}"


def test_rendering_is_deterministic_for_a_seed() -> None:
    rec = record(dr_icdr=3, dr_sdrg=3, drusen=True, focus=Assessment.ABNORMAL, artifacts=Assessment.ABNORMAL)
    first, inv1 = render_fundus(rec, 160, np.random.default_rng(42))
    second, inv2 = render_fundus(rec, 160, np.random.default_rng(42))
    other, _ = render_fundus(rec, 160, np.random.default_rng(43))
    assert first.tobytes() == second.tobytes() and inv1 == inv2
    assert first.tobytes() != other.tobytes()


@pytest.mark.parametrize("camera", ["Canon CR", "NIKON NF5050", None, "Topcon"])
@pytest.mark.parametrize("size", [96, 224])
def test_image_is_a_fundus_photograph(camera: str | None, size: int) -> None:
    for seed in range(3):
        rec = record(camera=camera, exam_eye=None, dr_icdr=seed + 1, dr_sdrg=None)
        image, _ = render_fundus(rec, size, np.random.default_rng(seed))
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (size, size)
        pixels = np.asarray(image, dtype=float)
        for corner in (pixels[:3, :3], pixels[:3, -3:], pixels[-3:, :3], pixels[-3:, -3:]):
            assert corner.max() == 0
        inside = pixels[pixels.sum(axis=2) > 30]
        assert len(inside) > 0.55 * size * size
        r, g, b = inside.mean(axis=0)
        assert r > g > b, f"{camera}: mean colour {r:.0f}, {g:.0f}, {b:.0f} is not reddish"


def test_cameras_have_distinct_colour_profiles() -> None:
    means = {}
    for camera in ("Canon CR", "NIKON NF5050"):
        values = []
        for seed in range(4):
            image, _ = render_fundus(
                record(camera=camera, dr_icdr=0, dr_sdrg=0), 96, np.random.default_rng(seed)
            )
            pixels = np.asarray(image, dtype=float)
            values.append(pixels[pixels.sum(axis=2) > 30].mean(axis=0))
        means[camera] = np.mean(values, axis=0)
    canon, nikon = means["Canon CR"], means["NIKON NF5050"]
    assert canon[1] / canon[0] > nikon[1] / nikon[0] + 0.03, "Nikon renders redder than Canon"


def sharpness(image: Image.Image) -> float:
    """Mean horizontal gradient in the central half at half resolution (which averages most sensor noise
    away, and leaves out the field-of-view edge that blur does not touch)."""
    grey = np.asarray(image.convert("L").reduce(2), dtype=float)
    quarter = grey.shape[0] // 4
    grey = grey[quarter:-quarter, quarter:-quarter]
    return float(np.abs(np.diff(grey, axis=1)).mean())


def brightness(image: Image.Image) -> float:
    grey = np.asarray(image.convert("L"), dtype=float)
    return float(grey[grey > 10].mean())


def test_quality_defects_show() -> None:
    for seed in range(3):
        rng = np.random.default_rng
        sharp, _ = render_fundus(record(dr_icdr=0, dr_sdrg=0), 224, rng(seed))
        blurred, _ = render_fundus(record(dr_icdr=0, dr_sdrg=0, focus=Assessment.ABNORMAL), 224, rng(seed))
        assert sharpness(blurred) < 0.8 * sharpness(sharp)
        poor, _ = render_fundus(record(dr_icdr=0, dr_sdrg=0, quality_adequate=False), 224, rng(seed))
        assert poor.tobytes() != sharp.tobytes()


def test_larger_cup_when_increased_cup_disc() -> None:
    cups = [
        build_anatomy(record(increased_cup_disc=flag), 224, np.random.default_rng(seed)).cup_ratio
        for flag in (False, True)
        for seed in range(10)
    ]
    assert max(cups[:10]) < min(cups[10:])


def test_benchmark_reports_a_rate() -> None:
    assert benchmark_render(2, 64) > 0
