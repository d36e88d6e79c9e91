"""Where MeSH release files come from: a local path, or a URL downloaded once per year.

Downloads land in ``<cache>/<year>/<file name>`` (the year taken from the file name, as
NLM names them ``desc2026.gz``/``mtrees2026.bin``, with or without a ``.gz`` ending), so a
second ``mesh load`` of the same release reads the cached copy. The cached copy keeps the
URL's name whatever its content: the readers tell gzip from plain by content, so a ``.gz``
that a server decompressed in transit (``Content-Encoding: gzip``) reads just the same.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import httpx

from meshdistill.errors import MeshSourceError
from meshdistill.mesh.formats import year_from_name

log = logging.getLogger(__name__)

NLM_MESH_BASE = "https://nlmpubs.nlm.nih.gov/projects/mesh/MESH_FILES/"


def nlm_release_urls(year: int) -> list[str]:
    """The descriptor XML alone carries UIs, names, tree numbers, scope notes and terms."""
    return [f"{NLM_MESH_BASE}xmlmesh/desc{year}.gz"]


def is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https", "ftp")


def resolve(source: str, cache_dir: Path, timeout: float = 120.0) -> Path:
    """A local path for ``source``, downloading a URL into the cache if it is not there."""
    if not is_url(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise MeshSourceError(f"MeSH source {source!r} is not a file or URL")
        return path
    name = Path(urlparse(source).path).name or "mesh-release"
    year = year_from_name(name)
    target = cache_dir / (str(year) if year else "unknown-year") / name
    if target.is_file() and target.stat().st_size > 0:
        log.info("MeSH: using cached %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("MeSH: downloading %s", source)
    # Download beside the target and rename when complete: a cut-off download never
    # poses as a cached release.
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".part", delete=False) as tmp:
        try:
            with httpx.stream("GET", source, timeout=timeout, follow_redirects=True) as resp:
                resp.raise_for_status()
                for chunk in resp.iter_bytes(1 << 20):
                    tmp.write(chunk)
        except httpx.HTTPError as exc:
            Path(tmp.name).unlink(missing_ok=True)
            raise MeshSourceError(f"cannot download MeSH source {source}: {exc}") from exc
    shutil.move(tmp.name, target)
    return target
