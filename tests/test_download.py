"""The MovieLens downloader against a local HTTP server serving a zip built here (no real network)."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import zipfile

import pytest

from attnrec.export.data.download import DATASETS, DatasetSpec, DownloadError, fetch_dataset

RATINGS = b"userId,movieId,rating,timestamp\n1,10,4.0,100\n2,20,3.5,200\n"


def make_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("toy/ratings.csv", RATINGS)
        zf.writestr("toy/README.txt", "a toy dataset")
    return buf.getvalue()


ZIP = make_zip()
MD5 = hashlib.md5(ZIP).hexdigest()


class Server:
    """Serves `files` (path -> bytes) on 127.0.0.1 and records the paths requested."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # a proxy would not reach 127.0.0.1
    s = Server()
    s.files["/toy.zip"] = ZIP
    yield s
    s.close()


def toy(md5: str | None = MD5, **kw) -> DatasetSpec:
    return DatasetSpec("toy", "toy/ratings.csv", md5=md5, **kw)


def test_download_extract_and_cache_hit(server, tmp_path):
    cache = tmp_path / "cache"
    path = fetch_dataset(toy(), cache, base_url=server.url, progress=False)
    assert path == cache / "toy" / "toy/ratings.csv"
    assert path.read_bytes() == RATINGS
    assert (cache / "toy.zip").read_bytes() == ZIP
    assert server.requests == ["/toy.zip"]

    again = fetch_dataset(toy(), cache, base_url=server.url, progress=False)
    assert again == path
    assert server.requests == ["/toy.zip"]  # the cached archive was verified, not fetched again


def test_progress_bar_does_not_break_download(server, tmp_path):
    assert fetch_dataset(toy(), tmp_path, base_url=server.url, progress=True).read_bytes() == RATINGS


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="md5 checksum mismatch"):
        fetch_dataset(toy(md5="0" * 32), cache, base_url=server.url, progress=False)
    assert list(cache.iterdir()) == []


def test_sha256_is_checked_too(server, tmp_path):
    with pytest.raises(DownloadError, match="sha256 checksum mismatch"):
        fetch_dataset(toy(sha256="0" * 64), tmp_path, base_url=server.url, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_md5_published_by_server(server, tmp_path):
    server.files["/toy.zip.md5"] = f"MD5 (toy.zip) = {MD5}\n".encode()
    path = fetch_dataset(toy(md5=None), tmp_path, base_url=server.url, progress=False)
    assert path.read_bytes() == RATINGS
    assert server.requests == ["/toy.zip.md5", "/toy.zip"]
    fetch_dataset(toy(md5=None), tmp_path, base_url=server.url, progress=False)
    assert len(server.requests) == 2  # the md5 was kept beside the archive: no request at all


def test_server_md5_mismatch(server, tmp_path):
    server.files["/toy.zip.md5"] = b"0123456789abcdef0123456789abcdef  toy.zip\n"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch_dataset(toy(md5=None), tmp_path, base_url=server.url, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_cached_archive_is_replaced(server, tmp_path):
    (tmp_path / "toy.zip").write_bytes(b"truncated")
    path = fetch_dataset(toy(), tmp_path, base_url=server.url, progress=False)
    assert path.read_bytes() == RATINGS
    assert server.requests == ["/toy.zip"]


def test_missing_archive_on_server(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        fetch_dataset(DatasetSpec("gone", "gone/ratings.csv", md5=MD5), tmp_path, base_url=server.url, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_ratings_file_missing_from_archive(server, tmp_path):
    with pytest.raises(DownloadError, match="no toy/ratings.dat"):
        fetch_dataset(DatasetSpec("toy", "toy/ratings.dat", md5=MD5), tmp_path, base_url=server.url, progress=False)


def test_default_cache_dir_from_env(server, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNREC_CACHE", str(tmp_path / "env-cache"))
    path = fetch_dataset(toy(), base_url=server.url, progress=False)
    assert path.is_relative_to(tmp_path / "env-cache")


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="ml-100k.*ml-latest-small"):
        fetch_dataset("ml-2k")


def test_registry():
    assert set(DATASETS) == {"ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-latest-small"}
    assert DATASETS["ml-1m"].url() == "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
    assert DATASETS["ml-100k"].ratings == "ml-100k/u.data"
    assert DATASETS["ml-latest-small"].md5 is None
    assert all(s.md5 and len(s.md5) == 32 for n, s in DATASETS.items() if n != "ml-latest-small")
