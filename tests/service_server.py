"""A real uvicorn server on a free localhost port, in a background thread, for service tests; and the
session's small index (the shared tiny bundle's 64-photograph archive). Not a test module."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from bundle_factory import TinyBundle, tiny_bundle

from index.archive.brset import read_archive
from index.build import BuildOptions, build_index
from index.metadata import MetadataTable
from index.store import StoreKind, read_info
from service.app import create_app
from service.settings import ServiceSettings


@dataclass(frozen=True)
class Served:
    """A running server: its base URL and the app's settings."""

    url: str
    settings: ServiceSettings
    app: object


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


_indexes: dict[str, Path] = {}


def tiny_index(factory: pytest.TempPathFactory, store: StoreKind = "faiss") -> tuple[TinyBundle, Path]:
    """The session's tiny bundle and an index of its archive in `store` (Milvus: a milvus-lite file beside
    the folder), built on first use."""
    tiny = tiny_bundle(factory)
    if store not in _indexes:
        out = factory.mktemp(f"service-index-{store}") / "index"
        milvus_uri = str(out.parent / "retina.db") if store == "milvus" else None
        build_index(BuildOptions(bundle=tiny.bundle, archive=tiny.archive, out=out, batch_size=16, device="cpu",
                                 store=store, milvus_uri=milvus_uri))
        _indexes[store] = out
    return tiny, _indexes[store]


def indexed_photo(index: Path, archive: Path) -> tuple[int, bytes]:
    """The first indexed photograph of an index: (its id, its file's bytes)."""
    info = read_info(index)
    table = MetadataTable.open(index / info.files.metadata)
    first_id = int(table.ids()[0])
    row = table.get([first_id])[first_id]
    return first_id, (Path(read_archive(archive, check_photos=False).root) / row.path).read_bytes()


@contextmanager
def serve(settings: ServiceSettings, wait_ready: bool = True, timeout: float = 60.0) -> Iterator[Served]:
    """Run the app for `settings` under uvicorn on a free port until the block ends."""
    port = free_port()
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    path = "/readyz" if wait_ready else "/healthz"
    headers = {"X-API-Key": settings.api_key.get_secret_value()} if settings.api_key else {}
    try:
        while True:
            try:
                if httpx.get(url + path, headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server at {url} did not answer 200 on {path} within {timeout} s")
            time.sleep(0.05)
        yield Served(url, settings, app)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
