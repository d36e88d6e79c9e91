"""MeSH release files from a URL: downloaded once into the cache by year, then reused."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from meshdistill.errors import MeshSourceError
from meshdistill.mesh.load import load_sources
from meshdistill.mesh.sources import resolve
from meshdistill.store import connect

from tests.support import MESH_DIR


class _Server:
    """Serves ../shared/data/mesh over HTTP on 127.0.0.1 and counts the GETs."""

    def __init__(self) -> None:
        server = self
        self.gets: list[str] = []

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args: object, **kwargs: object) -> None:
                super().__init__(*args, directory=str(MESH_DIR), **kwargs)  # type: ignore[arg-type]

            def do_GET(self) -> None:
                server.gets.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.close()


def test_url_is_downloaded_once_and_cached_by_year(server: _Server, tmp_path: Path) -> None:
    url = f"{server.url}/mtrees2023.bin"
    first = resolve(url, tmp_path)
    assert first == tmp_path / "2023" / "mtrees2023.bin"
    assert first.read_bytes() == (MESH_DIR / "mtrees2023.bin").read_bytes()
    again = resolve(url, tmp_path)
    assert again == first
    assert server.gets == ["/mtrees2023.bin"], "the second resolve must use the cache"


def test_download_errors_are_clear(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(MeshSourceError, match="cannot download MeSH source"):
        resolve(f"{server.url}/desc2099.gz", tmp_path)
    assert not any((tmp_path / "2099").glob("*")), "no partial file is left in the cache"
    with pytest.raises(MeshSourceError, match="not a file or URL"):
        resolve(str(tmp_path / "nowhere.bin"), tmp_path)


def test_sources_combine_from_urls_and_paths(
    server: _Server, tmp_path: Path, database_url: str
) -> None:
    sources = [f"{server.url}/mtrees2023.bin", str(MESH_DIR / "2017MeshTree.txt")]
    with connect(database_url) as conn:
        out = load_sources(conn, sources, tmp_path, replace_trees=True)
    assert out["report"]["year"] == 2023
    assert out["counts"]["tree_numbers"] == 63056
    # UIs for the 2023 names come from the 2017 table, joined on the name.
    assert out["report"]["tree_numbers_joined"] + out["report"]["tree_numbers_unjoined"] == 63056
    assert out["report"]["names_unjoined"] > 0
