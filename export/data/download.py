"""Download MovieLens archives into a local cache, verify their checksums, extract them.

Only for users who are online; everything else in attnrec reads local files. A failed or
mismatched download leaves nothing behind, and a cached archive is re-verified, never re-fetched.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens"
_CHUNK = 1 << 20
_TIMEOUT_S = 60


class DownloadError(RuntimeError):
    """A dataset could not be downloaded, verified or extracted."""


@dataclass(frozen=True)
class DatasetSpec:
    """One downloadable dataset: where its archive lives and how to check it."""

    name: str
    ratings: str  # the ratings file, relative to the archive's root
    md5: str | None = None  # None: no fixed checksum, check against the server's `<archive>.md5`
    sha256: str | None = None
    archive: str = ""  # file name on the server; "" means "<name>.zip"
    base_url: str = GROUPLENS_URL

    @property
    def archive_name(self) -> str:
        return self.archive or f"{self.name}.zip"

    def url(self, base_url: str | None = None) -> str:
        return f"{(base_url or self.base_url).rstrip('/')}/{self.archive_name}"


DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec(
            "ml-100k",
            "ml-100k/u.data",
            md5="0e33842e24a9c977be4e0107933c0723",
            sha256="50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        ),
        DatasetSpec("ml-1m", "ml-1m/ratings.dat", md5="c4d9eecfca2ab87c1945afe126590906"),
        DatasetSpec("ml-10m", "ml-10M100K/ratings.dat", md5="ce571fd55effeba0271552578f2648bd"),
        DatasetSpec("ml-20m", "ml-20m/ratings.csv", md5="cd245b17a1ae2cc31bb14903e1204af3"),
        DatasetSpec("ml-25m", "ml-25m/ratings.csv", md5="6b51fb2759a8657d3bfcbfc42b592ada"),
        DatasetSpec("ml-latest-small", "ml-latest-small/ratings.csv"),  # republished: no fixed md5
    )
}


def default_cache_dir() -> Path:
    """`$ATTNREC_CACHE`, else `~/.cache/attnrec/datasets`."""
    env = os.environ.get("ATTNREC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "attnrec" / "datasets"


def fetch_dataset(
    name: str | DatasetSpec,
    cache_dir: str | Path | None = None,
    *,
    base_url: str | None = None,
    progress: bool = True,
) -> Path:
    """Return the path of the dataset's ratings file, downloading and extracting it if needed.

    `name` is a key of DATASETS or a DatasetSpec of your own; `base_url` replaces the server.
    """
    spec = _spec(name)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    url = spec.url(base_url)
    archive = cache / spec.archive_name
    tree = cache / spec.name  # the archive's contents
    ratings = tree / spec.ratings

    if archive.is_file():
        if _verify(archive, _cached_md5(spec, archive, url), spec.sha256) is None:
            log.info("%s: using cached %s", spec.name, archive)
        else:
            log.warning("%s: cached %s fails its checksum; downloading again", spec.name, archive)
            archive.unlink()
            shutil.rmtree(tree, ignore_errors=True)
    if not archive.is_file():
        md5 = spec.md5 or _server_md5(url)
        _download(url, archive, md5, spec.sha256, spec.name, progress)
        if spec.md5 is None:
            _md5_sidecar(archive).write_text(md5 + "\n")  # lets a cache hit verify offline
    if not tree.is_dir():
        _extract(archive, tree)
    if not ratings.is_file():
        raise DownloadError(f"{archive} has no {spec.ratings}")
    return ratings


def _spec(name: str | DatasetSpec) -> DatasetSpec:
    if isinstance(name, DatasetSpec):
        return name
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None


def _cached_md5(spec: DatasetSpec, archive: Path, url: str) -> str:
    if spec.md5:
        return spec.md5
    sidecar = _md5_sidecar(archive)
    return sidecar.read_text().strip() if sidecar.is_file() else _server_md5(url)


def _md5_sidecar(archive: Path) -> Path:
    return archive.with_name(archive.name + ".md5")


def _server_md5(url: str) -> str:
    """The md5 published next to the archive (`<url>.md5`, in any of the usual layouts)."""
    text = _open(url + ".md5").read().decode("ascii", errors="replace")
    found = re.search(r"\b[0-9a-fA-F]{32}\b", text)
    if not found:
        raise DownloadError(f"{url}.md5 holds no md5 checksum: {text[:100]!r}")
    return found.group(0).lower()


def _open(url: str):
    request = urllib.request.Request(url, headers={"User-Agent": "attnrec"})
    try:
        return urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"could not download {url}: {e}") from e


def _download(url: str, archive: Path, md5: str, sha256: str | None, label: str, progress: bool) -> None:
    """Stream `url` to a temporary file beside `archive`, verify it, then rename it into place."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    fd, tmp_name = tempfile.mkstemp(dir=archive.parent, prefix=f".{archive.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        hashes = {"md5": hashlib.md5(), "sha256": hashlib.sha256()}
        with os.fdopen(fd, "wb") as out, _open(url) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
            )
            with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
                task = bar.add_task(f"downloading {label}", total=total)
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    for h in hashes.values():
                        h.update(chunk)
                    bar.advance(task, len(chunk))
        problem = _compare(hashes, md5, sha256)
        if problem:
            raise DownloadError(f"{url}: {problem}; the download was discarded")
        os.replace(tmp, archive)  # atomic: a reader never sees half an archive
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _verify(path: Path, md5: str, sha256: str | None) -> str | None:
    """None when `path` matches its checksums, else what differs."""
    hashes = {"md5": hashlib.md5(), "sha256": hashlib.sha256()}
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            for h in hashes.values():
                h.update(chunk)
    return _compare(hashes, md5, sha256)


def _compare(hashes: dict, md5: str, sha256: str | None) -> str | None:
    for algo, want in (("md5", md5), ("sha256", sha256)):
        got = hashes[algo].hexdigest()
        if want and got != want.lower():
            return f"{algo} checksum mismatch (expected {want.lower()}, got {got})"
    return None


def _extract(archive: Path, tree: Path) -> None:
    """Extract into a temporary folder, then rename it to `tree` so a partial tree never shows."""
    tmp = Path(tempfile.mkdtemp(dir=tree.parent, prefix=f".{tree.name}."))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)  # zipfile drops absolute paths and '..', so members stay inside tmp
        try:
            os.rename(tmp, tree)
        except OSError:
            if not tree.is_dir():  # otherwise another process extracted it first: keep theirs
                raise
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{archive}: not a valid zip archive: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
