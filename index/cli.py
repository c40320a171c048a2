"""`retina-index`: archive inspection (the index builder and queries join as they land)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from index.brset import ArchiveError, read_archive

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console(stderr=True)


@app.callback()
def main() -> None:
    """Runtime tools over archives, bundles and indexes (no torch)."""


@app.command()
def describe(
    archive: Annotated[Path, typer.Argument(help="A BRSET-layout archive folder.")],
    no_photos: Annotated[bool, typer.Option("--no-photos", help="Skip the photo cross-check.")] = False,
) -> None:
    """Print the parse report of an archive: missing, repaired and rejected values per column, label
    rows without a photo, photos without a row, and counts per ICDR and SDRG grade."""
    try:
        result = read_archive(archive, check_photos=not no_photos)
    except ArchiveError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(code=2) from None
    print(result.report.render())


if __name__ == "__main__":
    app()
