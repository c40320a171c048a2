"""Lesion positions in the synthetic inventory: every drawn DR lesion, in pixels of the photograph, inside the
field of view, where its pixels are; and recording them changed no pixel and no label (golden digests
recorded with the renderer as it was before positions were recorded)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import PIL
import pytest
from PIL import Image

from index.explain import field_mask
from index.records import Assessment, Eye, FundusRecord
from training.synth.archive import image_rng
from training.synth.lesions import DR_LESIONS, LesionInventory
from training.synth.render import render_fundus

# (ICDR, SDRG, extra fields) rendered at 160 px with image_rng(5, i); their digests (pixels + counts) were
# computed with the renderer of commit debebde, before lesion positions were recorded.
GOLDEN = [
    (1, 1, {}),
    (2, 2, {"macular_edema": True}),
    (3, 3, {"exam_eye": Eye.LEFT}),
    (4, 4, {"drusen": True}),
    (2, 3, {"focus": Assessment.ABNORMAL}),
    (0, 0, {"hemorrhage": True}),
]
GOLDEN_DIGESTS = ["981a3e10089cc4ac", "3f050db74f83af3a", "af6001a0b753f9ce", "0f6e57240a7cc0dd",
                  "307f23614c171af0", "53f7191900b1954b"]
GOLDEN_VERSIONS = ("2.4.6", "13.0.0")  # numpy, Pillow: other versions may draw other pixels


def _record(icdr: int, sdrg: int, i: int = 0, **extra: object) -> FundusRecord:
    values: dict[str, object] = {"image_id": f"g{i}", "patient_id": "p", "camera": "Canon CR",
                                 "exam_eye": Eye.RIGHT, "dr_icdr": icdr, "dr_sdrg": sdrg}
    values.update(extra)
    return FundusRecord(**values)  # type: ignore[arg-type]


def test_recording_positions_changed_no_pixel_and_no_count() -> None:
    if (np.__version__, PIL.__version__) != GOLDEN_VERSIONS:
        pytest.skip(f"golden digests were recorded with numpy/Pillow {GOLDEN_VERSIONS}")
    digests = []
    for i, (icdr, sdrg, extra) in enumerate(GOLDEN):
        image, inv = render_fundus(_record(icdr, sdrg, i, **extra), 160, image_rng(5, i))
        counts = json.dumps({"counts": inv.counts, "quadrant_counts": inv.quadrant_counts,
                             "grade_conflict": inv.grade_conflict}, sort_keys=True)
        digests.append(hashlib.sha256(np.asarray(image).tobytes() + counts.encode()).hexdigest()[:16])
    assert digests == GOLDEN_DIGESTS


@pytest.mark.parametrize(("icdr", "sdrg"), [(1, 1), (2, 2), (3, 3), (4, 4)])
def test_positions_match_the_counts_and_lie_in_the_field(icdr: int, sdrg: int) -> None:
    for seed in range(3):
        eye = Eye.LEFT if seed % 2 else Eye.RIGHT
        image, inv = render_fundus(_record(icdr, sdrg, exam_eye=eye, drusen=True), 224,
                                   np.random.default_rng(seed))
        assert inv.lesions is not None
        by_kind: dict[str, int] = {}
        for lesion in inv.lesions:
            by_kind[lesion.kind] = by_kind.get(lesion.kind, 0) + 1
        assert by_kind == {kind: inv.total(kind) for kind in DR_LESIONS if inv.total(kind)}
        mask = field_mask(np.asarray(image))
        for lesion in inv.lesions:
            assert 0 < lesion.r < 0.3 * 224, lesion
            assert mask[int(lesion.y), int(lesion.x)], lesion  # on the retina, not the black border


def test_positions_are_where_the_haemorrhages_are_drawn() -> None:
    """Red-free darkness inside each haemorrhage's circle against a ring around it; the same circles
    mirrored left-right (a wrong laterality in the mapping) must not show it."""
    contrast, mirrored = [], []
    for seed in range(4):
        image, inv = render_fundus(_record(2, 2, exam_eye=Eye.LEFT if seed % 2 else Eye.RIGHT), 224,
                                   np.random.default_rng(seed))
        green = np.asarray(image, np.float32)[..., 1]
        ys, xs = np.mgrid[0:224, 0:224] + 0.5
        for lesion in inv.lesions or []:
            if lesion.kind not in ("blot_haemorrhage", "dot_haemorrhage") or lesion.r < 2:
                continue
            for x, out in ((lesion.x, contrast), (224 - lesion.x, mirrored)):
                d = np.hypot(xs - x, ys - lesion.y)
                inside, ring = green[d <= 0.5 * lesion.r], green[(d > 2 * lesion.r) & (d <= 3 * lesion.r)]
                out.append(float(ring.mean() - inside.mean()))
    assert len(contrast) >= 10
    assert np.median(contrast) > 25 and np.median(mirrored) < 10, (np.median(contrast), np.median(mirrored))


def test_inventories_without_positions_still_read() -> None:
    old = {"counts": {"microaneurysm": {"superior": 1, "inferior": 0}},
           "quadrant_counts": {"microaneurysm": {"superotemporal": 1, "superonasal": 0, "inferotemporal": 0,
                                                 "inferonasal": 0}},
           "grade_conflict": False}
    inv = LesionInventory.model_validate(old)
    assert inv.lesions is None and inv.total("microaneurysm") == 1
    _, rendered = render_fundus(_record(1, 1), 128, np.random.default_rng(0))
    again = LesionInventory.model_validate(json.loads(json.dumps(rendered.model_dump())))
    assert again == rendered and again.lesions


def test_archive_writes_positions(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from training.synth.archive import read_inventory, write_archive

    records = [_record(icdr, sdrg, i) for i, (icdr, sdrg) in enumerate([(0, 0), (2, 2), (4, 4)])]
    write_archive(records, tmp_path / "a", size=128, seed=4)
    lines = read_inventory(tmp_path / "a")
    assert lines[0]["lesions"] == []
    for line in lines[1:]:
        dr_total = sum(sum(v.values()) for k, v in line["counts"].items() if k in DR_LESIONS)
        assert len(line["lesions"]) == dr_total > 0
        photo = np.asarray(Image.open(tmp_path / "a" / "fundus_photos" / f"{line['image_id']}.jpg"))
        assert all(0 <= les["x"] < photo.shape[1] and 0 <= les["y"] < photo.shape[0] for les in line["lesions"])
