"""A contact sheet: a grid of archive photographs, one row per ICDR grade."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from index.records import ICDR_NAMES, SDRG_NAMES, FundusRecord

LABEL_HEIGHT = 18
ROW_TITLE_HEIGHT = 22


def write_contact_sheet(
    records: Sequence[FundusRecord],
    photo_path: Callable[[str], Path | None],
    out: Path,
    per_grade: int = 6,
    thumb: int = 160,
) -> Path:
    """Write a PNG grid: for each ICDR grade 0-4, up to `per_grade` photographs labelled with their
    ICDR/SDRG grades and eye. Grades with no photograph get an empty row that says so."""
    font = ImageFont.load_default()
    width = per_grade * thumb
    row_height = ROW_TITLE_HEIGHT + thumb + LABEL_HEIGHT
    sheet = Image.new("RGB", (width, row_height * len(ICDR_NAMES)), "white")
    draw = ImageDraw.Draw(sheet)
    for grade, name in enumerate(ICDR_NAMES):
        top = grade * row_height
        chosen = [r for r in records if r.dr_icdr == grade][:per_grade]
        title = f"ICDR {grade}: {name}" + ("" if chosen else " (none in this archive)")
        draw.text((4, top + 4), title, fill="black", font=font)
        for column, record in enumerate(chosen):
            path = photo_path(record.image_id)
            if path is None:
                continue
            with Image.open(path) as photo:
                tile = photo.convert("RGB").resize((thumb, thumb), Image.Resampling.BILINEAR)
            left = column * thumb
            sheet.paste(tile, (left, top + ROW_TITLE_HEIGHT))
            eye = record.exam_eye.name.lower() if record.exam_eye else "eye ?"
            sdrg = SDRG_NAMES[record.dr_sdrg].split()[0] if record.dr_sdrg is not None else "R?"
            draw.text((left + 4, top + ROW_TITLE_HEIGHT + thumb + 2), f"{sdrg} {eye}", fill="black", font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
