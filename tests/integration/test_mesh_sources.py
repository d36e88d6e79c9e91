"""MeSH release files from a URL: downloaded once into the cache by year, then reused."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from meshdistill.errors import MeshSourceError
from meshdistill.fileio import is_gzip
from meshdistill.mesh.formats import MeshFormat, read_mtrees, sniff_format
from meshdistill.mesh.load import load_sources
from meshdistill.mesh.sources import resolve
from meshdistill.store import connect

from tests.support import MESH_DIR, MESH_TREE_2017, MTREES_2023

pytestmark = pytest.mark.integration


class _Server:
    """Serves the repository's data/mesh (gzip files) over HTTP on 127.0.0.1 and counts
    the GETs. Under ``/encoded/`` a file is sent with ``Content-Encoding: gzip``, as some
    servers send ``.gz`` files: the client then stores it decompressed."""

    def __init__(self) -> None:
        server = self
        self.gets: list[str] = []

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args: object, **kwargs: object) -> None:
                super().__init__(*args, directory=str(MESH_DIR), **kwargs)  # type: ignore[arg-type]

            def do_GET(self) -> None:
                server.gets.append(self.path)
                if self.path.startswith("/encoded/"):
                    body = (MESH_DIR / self.path.removeprefix("/encoded/")).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Encoding", "gzip")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
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
    url = f"{server.url}/mtrees2023.bin.gz"
    first = resolve(url, tmp_path)
    assert first == tmp_path / "2023" / "mtrees2023.bin.gz"  # the year read past ".bin.gz"
    assert first.read_bytes() == MTREES_2023.read_bytes()  # stored as served, still gzip
    again = resolve(url, tmp_path)
    assert again == first
    assert server.gets == ["/mtrees2023.bin.gz"], "the second resolve must use the cache"


def test_gzip_decoded_in_transit_is_read_by_content(server: _Server, tmp_path: Path) -> None:
    path = resolve(f"{server.url}/encoded/mtrees2023.bin.gz", tmp_path)
    assert path == tmp_path / "2023" / "mtrees2023.bin.gz"
    assert not is_gzip(path), "httpx undoes the Content-Encoding"
    assert path.read_bytes() == gzip.decompress(MTREES_2023.read_bytes())
    assert sniff_format(path) is MeshFormat.MTREES
    assert list(read_mtrees(path)) == list(read_mtrees(MTREES_2023))


def test_download_errors_are_clear(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(MeshSourceError, match="cannot download MeSH source"):
        resolve(f"{server.url}/desc2099.gz", tmp_path)
    assert not any((tmp_path / "2099").glob("*")), "no partial file is left in the cache"
    with pytest.raises(MeshSourceError, match="not a file or URL"):
        resolve(str(tmp_path / "nowhere.bin"), tmp_path)


def test_sources_combine_from_urls_and_paths(
    server: _Server, tmp_path: Path, database_url: str
) -> None:
    sources = [f"{server.url}/mtrees2023.bin.gz", str(MESH_TREE_2017)]
    with connect(database_url) as conn:
        out = load_sources(conn, sources, tmp_path, replace_trees=True)
    assert out["report"]["year"] == 2023
    assert out["counts"]["tree_numbers"] == 63056
    # UIs for the 2023 names come from the 2017 table, joined on the name.
    assert out["report"]["tree_numbers_joined"] + out["report"]["tree_numbers_unjoined"] == 63056
    assert out["report"]["names_unjoined"] > 0
