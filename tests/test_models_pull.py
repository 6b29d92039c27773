"""`assistant models pull`: the real download code against a local HTTP server the tests start.

The server (``FakeHub``) speaks like the Hugging Face hub where it matters: a
``/REPO/resolve/main/FILE`` URL answers 302 to a CDN path with the file's
sha256 in ``X-Linked-ETag``; files are served with Range requests (206,
Content-Range, 416). It can break a transfer after N bytes, ignore Range,
send no Content-Length, answer an error, or redirect elsewhere. The models
are tiny random-weight GGUF files from tests/gguf_writer.py; the last test
loads one through a real daemon by the alias the pull recorded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from gguf_writer import tiny_mtp_gguf, write_gguf

from assistant.config import Config, ModelEntry, catalog, load_config
from assistant.config.catalog import CatalogEntry, CatalogFile
from assistant.config.download import (ChecksumMismatch, DownloadError, Interrupted, NotFound, NotGGUF, Transfer,
                                       download, safe_filename, url_filename)
from assistant.config.models import PULLED_MANIFEST, list_models, models_dir, read_pulled, resolve_model
from assistant.config.pull import plan_pull, run_pull
from assistant.testing import run_cli


# --------------------------------------------------------------------------
# The local hub


class FakeHub:
    """A local HTTP server with the hub's shape (see the module docstring); records every request."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}  # path served directly -> bytes
        self.lfs: dict[str, tuple[str, str]] = {}  # resolve path -> (cdn path, advertised sha256)
        self.drop: dict[str, list[int]] = {}  # path -> bytes to send before closing, one per request
        self.status: dict[str, int] = {}
        self.location: dict[str, str] = {}  # path -> a redirect to this URL
        self.ignore_range: set[str] = set()
        self.no_length: set[str] = set()
        self.stall: dict[str, int] = {}  # path -> bytes to send, then wait until the test is over
        self.release = threading.Event()
        self.requests: list[tuple[str, str | None, str | None]] = []  # (path, Range, Authorization)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.hub = self
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def add(self, repo_path: str, data: bytes, *, lfs: bool = True, sha256: str | None = None) -> str:
        """Serve ``data`` at ``/{repo_path}`` (through a 302 to /cdn/... when ``lfs``); its URL."""
        path = "/" + repo_path.lstrip("/")
        if lfs:
            digest = hashlib.sha256(data).hexdigest()
            cdn = f"/cdn/{digest}-{len(self.files)}"
            self.files[cdn] = data
            self.lfs[path] = (cdn, sha256 or digest)
        else:
            self.files[path] = data
        return self.base + path

    def cdn(self, url: str) -> str:
        return self.lfs[urllib.parse.urlsplit(url).path][0]

    def hits(self, path: str) -> list[tuple[str, str | None, str | None]]:
        return [r for r in self.requests if r[0] == path]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        hub: FakeHub = self.server.hub
        path = urllib.parse.urlsplit(self.path).path
        hub.requests.append((path, self.headers.get("Range"), self.headers.get("Authorization")))
        if path in hub.status:
            self.send_error(hub.status[path])
            return
        if path in hub.location:
            self._redirect(hub.location[path], {})
            return
        if path in hub.lfs:
            cdn, sha = hub.lfs[path]
            self._redirect(cdn + "?sig=secret", {"X-Linked-ETag": f'"{sha}"',
                                                 "X-Linked-Size": str(len(hub.files[cdn]))})
            return
        data = hub.files.get(path)
        if data is None:
            self.send_error(404)
            return
        self._send(hub, path, data)

    def _redirect(self, location: str, headers: dict[str, str]) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, hub: FakeHub, path: str, data: bytes) -> None:
        start = 0
        rng = self.headers.get("Range")
        if rng and path not in hub.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if path not in hub.no_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if path in hub.stall:
            self.wfile.write(body[:hub.stall.pop(path)])
            self.wfile.flush()
            hub.release.wait(60)
            return
        cut = hub.drop.get(path)
        if cut:
            self.wfile.write(body[:cut.pop(0)])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)  # the transfer breaks off here
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def hub(monkeypatch):
    h = FakeHub()
    monkeypatch.setenv("ASSISTANT_HF_ENDPOINT", h.base)
    for var in ("HF_ENDPOINT", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    yield h
    h.close()


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory) -> bytes:
    """A tiny random-weight glm4moe GGUF that llama.cpp loads (tests/gguf_writer.py)."""
    return tiny_mtp_gguf(tmp_path_factory.mktemp("pull") / "tiny.gguf", nextn=False).read_bytes()


def companion_bytes(tmp_path: Path, arch: str, n_floats: int = 64) -> bytes:
    """A small GGUF whose header names ``arch`` (a stand-in drafter or projector file)."""
    p = write_gguf(tmp_path / f"{arch}-{n_floats}.gguf", {"general.architecture": arch},
                   {"pad": (np.zeros(n_floats, np.float32), "F32")})
    return p.read_bytes()


@pytest.fixture
def dl(tmp_path) -> Path:
    """A folder of its own for a test's downloads."""
    d = tmp_path / "dl"
    d.mkdir()
    return d


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(directory: Path) -> list[str]:
    """Files a failed pull left behind (lock files aside)."""
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".lock"))


# --------------------------------------------------------------------------
# One transfer (assistant.config.download)


def test_download_follows_the_hub_redirect_and_checks_its_digest(hub, model_bytes, tmp_path):
    url = hub.add("org/tiny-GGUF/resolve/main/tiny.gguf", model_bytes)
    got = download(Transfer(url, tmp_path / "m" / "tiny.gguf"))
    assert got.path.read_bytes() == model_bytes
    assert got.sha256 == sha(model_bytes) and got.verified == "the server's digest"
    assert got.architecture == "glm4moe"
    assert leftovers(tmp_path / "m") == ["tiny.gguf"]


def test_interrupted_transfer_resumes_with_a_range_request(hub, model_bytes, tmp_path):
    url = hub.add("org/r/resolve/main/tiny.gguf", model_bytes)
    cdn = hub.cdn(url)
    hub.drop[cdn] = [5000]
    dest = tmp_path / "m" / "tiny.gguf"
    with pytest.raises(Interrupted) as exc:
        download(Transfer(url, dest, label="model"), retries=0)
    assert "5,000 bytes are kept" in str(exc.value) and "run the same pull again to resume" in str(exc.value)
    assert not dest.exists()  # never a half-written file under the final name
    assert (dest.parent / "tiny.gguf.part").stat().st_size == 5000

    got = download(Transfer(url, dest), retries=0)
    assert got.resumed_from == 5000 and got.path.read_bytes() == model_bytes
    assert [r[1] for r in hub.hits(cdn)] == [None, "bytes=5000-"]
    assert leftovers(dest.parent) == ["tiny.gguf"]


def test_broken_connections_are_retried_from_where_they_stopped(hub, model_bytes, tmp_path):
    url = hub.add("org/r/resolve/main/tiny.gguf", model_bytes)
    cdn = hub.cdn(url)
    hub.drop[cdn] = [3000, 4000]
    got = download(Transfer(url, tmp_path / "tiny.gguf"), retries=3, backoff=0)
    assert got.path.read_bytes() == model_bytes and got.sha256 == sha(model_bytes) and got.resumed_from == 0
    assert [r[1] for r in hub.hits(cdn)] == [None, "bytes=3000-", "bytes=7000-"]


def test_checksum_mismatch_is_refused_and_the_partial_removed(hub, model_bytes, tmp_path):
    # The hub publishes one digest and sends other bytes (corruption on the way, or a lying mirror).
    url = hub.add("org/r/resolve/main/tiny.gguf", model_bytes, sha256="ab" * 32)
    dest = tmp_path / "m" / "tiny.gguf"
    with pytest.raises(ChecksumMismatch) as exc:
        download(Transfer(url, dest))
    assert f"its sha256 is {sha(model_bytes)}" in str(exc.value) and "removed" in str(exc.value)
    assert leftovers(dest.parent) == []


def test_a_pin_that_disagrees_with_the_server_is_refused_before_downloading(hub, model_bytes, dl):
    url = hub.add("org/r/resolve/main/tiny.gguf", model_bytes)
    with pytest.raises(ChecksumMismatch) as exc:
        download(Transfer(url, dl / "tiny.gguf", sha256="cd" * 32, sha256_from="the catalog"))
    assert "changed upstream" in str(exc.value) and f"--sha256 {sha(model_bytes)}" in str(exc.value)
    assert hub.hits(hub.cdn(url)) == []  # not a byte fetched
    assert leftovers(dl) == []


def test_a_given_sha256_is_checked_where_the_server_publishes_none(hub, model_bytes, dl):
    url = hub.add("plain/tiny.gguf", model_bytes, lfs=False)
    got = download(Transfer(url, dl / "a.gguf", sha256=sha(model_bytes), sha256_from="--sha256"))
    assert got.verified == "--sha256"
    with pytest.raises(ChecksumMismatch):
        download(Transfer(url, dl / "b.gguf", sha256="00" * 32, sha256_from="--sha256"))
    assert not (dl / "b.gguf").exists() and not (dl / "b.gguf.part").exists()


def test_a_404_is_named(hub, tmp_path):
    url = hub.base + "/org/missing/resolve/main/nope.gguf"
    with pytest.raises(NotFound) as exc:
        download(Transfer(url, tmp_path / "m" / "nope.gguf"))
    assert str(exc.value) == f"not found (HTTP 404): {url}"
    assert leftovers(tmp_path / "m") == []


def test_a_non_gguf_download_is_refused_at_its_first_bytes(hub, dl):
    url = hub.add("org/r/resolve/main/page.gguf", b"<!DOCTYPE html><html>log in to continue</html>" * 50)
    with pytest.raises(NotGGUF) as exc:
        download(Transfer(url, dl / "page.gguf", label="model"))
    assert "is not a GGUF file" in str(exc.value) and "<!DO" in str(exc.value)
    assert leftovers(dl) == []


def test_a_truncated_gguf_is_refused(hub, model_bytes, dl):
    url = hub.add("org/r/resolve/main/cut.gguf", model_bytes[:40])  # magic, then the header breaks off
    with pytest.raises(NotGGUF) as exc:
        download(Transfer(url, dl / "cut.gguf"))
    assert "truncated" in str(exc.value)
    assert leftovers(dl) == []


def test_a_server_that_ignores_range_restarts_cleanly(hub, model_bytes, dl):
    url = hub.add("org/r/resolve/main/tiny.gguf", model_bytes)
    cdn = hub.cdn(url)
    hub.drop[cdn] = [2000]
    hub.ignore_range.add(cdn)
    with pytest.raises(Interrupted):
        download(Transfer(url, dl / "tiny.gguf"), retries=0)
    got = download(Transfer(url, dl / "tiny.gguf"), retries=0)
    assert got.path.read_bytes() == model_bytes and got.resumed_from == 0
    assert hub.hits(cdn)[-1][1] == "bytes=2000-"  # asked; the 200 it got was taken from byte 0


def test_a_partial_file_of_another_download_is_not_continued(hub, model_bytes, dl):
    url = hub.add("org/r/resolve/main/tiny.gguf", model_bytes)
    (dl / "tiny.gguf.part").write_bytes(b"GGUF" + b"x" * 999)
    (dl / "tiny.gguf.part.json").write_text(json.dumps({"url": "http://elsewhere/tiny.gguf"}))
    got = download(Transfer(url, dl / "tiny.gguf"))
    assert got.path.read_bytes() == model_bytes and got.resumed_from == 0
    assert hub.hits(hub.cdn(url))[0][1] is None


def test_a_complete_partial_file_is_finished_on_a_416(hub, model_bytes, dl):
    url = hub.add("org/r/resolve/main/tiny.gguf", model_bytes)
    cdn = hub.cdn(url)
    hub.drop[cdn] = [len(model_bytes) - 1]
    with pytest.raises(Interrupted):
        download(Transfer(url, dl / "tiny.gguf"), retries=0)
    part = dl / "tiny.gguf.part"
    with open(part, "ab") as f:
        f.write(model_bytes[-1:])  # the last byte arrived after all (as a killed process may leave it)
    got = download(Transfer(url, dl / "tiny.gguf"), retries=0)
    assert got.path.read_bytes() == model_bytes
    assert hub.hits(cdn)[-1][1] == f"bytes={len(model_bytes)}-"


def test_redirects_to_other_schemes_are_refused(hub, dl):
    hub.location["/evil.gguf"] = "file:///etc/passwd"
    with pytest.raises(DownloadError) as exc:
        download(Transfer(hub.base + "/evil.gguf", dl / "evil.gguf"))
    assert "redirect" in str(exc.value) or "file" in str(exc.value)
    assert leftovers(dl) == []


def test_the_token_goes_only_to_the_hub_host(hub, model_bytes, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    cdn_path = "/cdn/elsewhere.gguf"
    hub.files[cdn_path] = model_bytes
    # The hub (127.0.0.1) redirects to another host name (localhost): the token must not follow.
    hub.location["/org/r/resolve/main/t.gguf"] = f"http://localhost:{hub.port}{cdn_path}"
    plan = plan_pull(hub.base + "/org/r/resolve/main/t.gguf", models_dir=tmp_path)
    run_pull(plan)
    first, second = hub.requests[-2:]
    assert first[2] == "Bearer hf_secret_value" and second[0] == cdn_path and second[2] is None
    # A redirect on the hub's own host keeps it (a gated file's CDN path there needs it).
    same = hub.add("org/r/resolve/main/same.gguf", model_bytes)
    run_pull(plan_pull(same, models_dir=tmp_path))
    assert [r[2] for r in hub.requests[-2:]] == ["Bearer hf_secret_value"] * 2
    # A URL on another host than the hub's never gets it at all.
    hub.files["/direct.gguf"] = model_bytes
    run_pull(plan_pull(f"http://localhost:{hub.port}/direct.gguf", models_dir=tmp_path))
    assert hub.requests[-1] == ("/direct.gguf", None, None)


def test_names_and_urls_are_sanitised():
    for bad in ("", ".", "..", ".hidden.gguf", "a/b.gguf", "a\\b.gguf", "nul\x00.gguf", "x" * 300 + ".gguf"):
        with pytest.raises(DownloadError):
            safe_filename(bad)
    # A path in the URL gives only its last part; an encoded ".." is refused, not followed.
    assert url_filename("https://h/x/%2E%2E%2Fetc%2Fpasswd.gguf") == "passwd.gguf"
    for bad in ("https://h/x/%2e%2e", "https://h/x/.env", "ftp://h/a.gguf", "file:///etc/passwd",
                "https://h/a b.gguf", "https:///a.gguf", "javascript:alert(1)"):
        with pytest.raises(DownloadError):
            url_filename(bad)
    for bad_alias in ("../up", "a/b", ".hidden", "smollm2-135m", "x.gguf", "-x", "a" * 65):
        with pytest.raises(DownloadError):
            plan_pull("https://h/a.gguf", models_dir=Path("/tmp/m"), name=bad_alias)
    with pytest.raises(DownloadError, match="only GGUF"):
        plan_pull("https://h/archive.zip", models_dir=Path("/tmp/m"))
    with pytest.raises(DownloadError, match="unknown model 'gemma9'.*gemma4-12b"):
        plan_pull("gemma9", models_dir=Path("/tmp/m"))


# --------------------------------------------------------------------------
# The catalog


def test_catalog_entries_name_repositories_files_and_companions(hub):
    assert {"gemma4-12b", "gemma4-e4b", "gemma4-e2b"} <= set(catalog.CATALOG)
    for entry in catalog.CATALOG.values():
        assert [f.role for f in entry.files].count("model") == 1
        for f in entry.files:
            assert f.url == f"{hub.base}/{f.repo}/resolve/main/{f.path}"  # the endpoint is overridable
            assert f.sha256 is None or (len(f.sha256) == 64 and int(f.sha256, 16) >= 0)
            assert safe_filename(f.filename).endswith(".gguf")
        plan = plan_pull(entry.name, models_dir=Path("/tmp/m"))
        assert plan.name == entry.name and plan.directory == Path("/tmp/m") / entry.name
        for pf in plan.files:
            if pf.role != "model":
                assert pf.transfer.dest.name.startswith(pf.role + "-")  # where sibling discovery looks
    big = catalog.CATALOG["gemma4-12b"]
    assert {f.role for f in big.files} == {"model", "mtp", "mmproj"}


def test_a_catalog_pull_fetches_companions_and_the_alias_resolves(hub, model_bytes, tmp_path, monkeypatch):
    mtp, mmproj = companion_bytes(tmp_path, "gemma4-assistant"), companion_bytes(tmp_path, "clip", 128)
    entry = CatalogEntry("tiny-test", "a tiny test model", (
        CatalogFile("model", "org/tiny-GGUF", "tiny-Q8_0.gguf"),
        CatalogFile("mtp", "org/tiny-GGUF", "MTP/mtp-tiny-Q8_0.gguf", len(mtp), sha(mtp)),
        CatalogFile("mmproj", "org/tiny-GGUF", "mmproj-F16.gguf", len(mmproj), sha(mmproj)),
    ))
    monkeypatch.setitem(catalog.CATALOG, entry.name, entry)
    for f, data in zip(entry.files, (model_bytes, mtp, mmproj)):
        hub.add(f"{f.repo}/resolve/main/{f.path}", data)
    config = Config(models_dir=str(tmp_path / "models"))
    result = run_pull(plan_pull("tiny-test", models_dir=models_dir(config)))
    assert result.ok and set(result.fetched) == {"model", "mtp", "mmproj"}
    assert result.fetched["mtp"].verified == "the catalog"
    folder = tmp_path / "models" / "tiny-test"
    assert leftovers(folder) == ["mmproj-F16.gguf", "mtp-tiny-Q8_0.gguf", "tiny-Q8_0.gguf"]

    spec = resolve_model("tiny-test", config)
    assert spec.path == folder / "tiny-Q8_0.gguf"
    spec.for_backend("llama.cpp")  # the backend's own check of the file passes
    listed = {m["name"]: m for m in list_models(config)}["tiny-test"]
    assert listed["pulled"] and listed["present"] and listed["size_bytes"] == len(model_bytes)
    assert listed["companions"]["mtp"]["path"] == str(folder / "mtp-tiny-Q8_0.gguf")
    assert listed["companions"]["mmproj"]["architecture"] == "clip"

    # Pulled again: nothing is fetched again.
    before = len(hub.requests)
    again = run_pull(plan_pull("tiny-test", models_dir=models_dir(config)))
    assert again.fetched == {} and sorted(again.present) == ["mmproj", "model", "mtp"]
    assert len(hub.requests) == before


def test_a_failed_companion_keeps_the_model_and_is_named(hub, model_bytes, tmp_path, monkeypatch):
    entry = CatalogEntry("half", "x", (CatalogFile("model", "o/r", "m.gguf"), CatalogFile("mtp", "o/r", "mtp-m.gguf")))
    monkeypatch.setitem(catalog.CATALOG, "half", entry)
    hub.add("o/r/resolve/main/m.gguf", model_bytes)
    result = run_pull(plan_pull("half", models_dir=tmp_path))
    assert not result.ok and isinstance(result.failed["mtp"], NotFound)
    assert read_pulled(tmp_path)["half"]["companions"] == {}
    assert resolve_model("half", Config(models_dir=str(tmp_path))).path == tmp_path / "half" / "m.gguf"


def test_an_alias_pulled_from_elsewhere_is_not_replaced_without_force(hub, model_bytes, tmp_path):
    a = hub.add("a/tiny.gguf", model_bytes, lfs=False)
    b = hub.add("b/tiny.gguf", model_bytes, lfs=False)
    run_pull(plan_pull(a, models_dir=tmp_path, name="mine"))
    with pytest.raises(DownloadError, match="already pulled, from .*--force"):
        run_pull(plan_pull(b, models_dir=tmp_path, name="mine"))
    run_pull(plan_pull(b, models_dir=tmp_path, name="mine"), force=True)
    assert read_pulled(tmp_path)["mine"]["source"] == b


def test_a_catalog_name_not_pulled_yet_says_how(tmp_path):
    with pytest.raises(Exception, match="in the catalog but not pulled yet.*assistant models pull gemma4-12b"):
        resolve_model("gemma4-12b", Config(models_dir=str(tmp_path)))


def test_a_damaged_manifest_is_reported_and_resolution_goes_on(tmp_path, model_bytes):
    (tmp_path / PULLED_MANIFEST).write_text("{not json")
    config = Config(models_dir=str(tmp_path), models={"mine": ModelEntry(path=str(tmp_path / "x.gguf"))})
    (tmp_path / "x.gguf").write_bytes(model_bytes)
    assert resolve_model("mine", config).path == tmp_path / "x.gguf"
    bad = [m for m in list_models(config) if m.get("pulled")]
    assert bad and "fix or delete it" in bad[0]["error"]
    # A manifest edited to point outside the models dir is not followed.
    (tmp_path / PULLED_MANIFEST).write_text(json.dumps({"models": {"evil": {"file": "../x.gguf"}}}))
    with pytest.raises(Exception, match="outside"):
        resolve_model("evil", config)


# --------------------------------------------------------------------------
# The command


def _config(tmp_path: Path, models: Path) -> Path:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"models_dir: {models}\n")
    return cfg


def test_cli_pull_url_with_companions_progress_and_list(hub, model_bytes, tmp_path):
    models = tmp_path / "models"
    cfg = _config(tmp_path, models)
    url = hub.add("org/t/resolve/main/Tiny-Q8_0.gguf", model_bytes)
    mtp = hub.add("org/t/resolve/main/MTP/tiny-drafter.gguf", companion_bytes(tmp_path, "gemma4-assistant"))
    mmproj = hub.add("org/t/resolve/main/mmproj-tiny.gguf", companion_bytes(tmp_path, "clip"))
    r = run_cli("models", "pull", url, "--mtp", mtp, "--mmproj", mmproj, config=cfg)
    assert r.returncode == 0, r.stderr
    assert "model Tiny-Q8_0.gguf: 100%" in r.stderr  # plain progress lines when not on a terminal
    assert "pulled tiny-q8_0 into" in r.stdout and "sha256 checked against the server's digest" in r.stdout
    folder = models / "tiny-q8_0"
    # The drafter gets the mtp- prefix sibling discovery looks for.
    assert leftovers(folder) == ["Tiny-Q8_0.gguf", "mmproj-tiny.gguf", "mtp-tiny-drafter.gguf"]

    r = run_cli("models", "list", "--json", config=cfg)
    item = {m["name"]: m for m in json.loads(r.stdout)["available"]}["tiny-q8_0"]
    assert item["path"] == str(folder / "Tiny-Q8_0.gguf") and item["present"]
    assert item["companions"]["mtp"]["path"] == str(folder / "mtp-tiny-drafter.gguf")
    r = run_cli("models", "list", config=cfg)
    assert "tiny-q8_0" in r.stdout and "+ mtp" in r.stdout and "+ mmproj" in r.stdout


def test_cli_real_catalog_entry_names_a_404_and_refuses_a_bad_file(hub, model_bytes, tmp_path):
    entry = catalog.CATALOG["gemma4-e4b"]
    files = {f.role: f for f in entry.files}
    hub.add(f"{files['model'].repo}/resolve/main/{files['model'].path}", model_bytes)
    # The drafter: the hub publishes the catalog's digest but sends other bytes.
    hub.add(f"{files['mtp'].repo}/resolve/main/{files['mtp'].path}", companion_bytes(tmp_path, "gemma4-assistant"),
            sha256=files["mtp"].sha256)
    models = tmp_path / "models"
    r = run_cli("models", "pull", "gemma4-e4b", config=_config(tmp_path, models))
    assert r.returncode == 1
    assert f"mmproj  failed: not found (HTTP 404): {files['mmproj'].url}" in r.stdout
    assert "mtp     failed: checksum mismatch for mtp-gemma-4-E4B-it-Q8_0.gguf" in r.stdout
    assert leftovers(models / "gemma4-e4b") == ["gemma-4-E4B-it-Q4_0.gguf"]  # no partial of the bad file
    assert read_pulled(models)["gemma4-e4b"]["catalog"] == "gemma4-e4b"


def test_cli_never_prints_the_token(hub, tmp_path):
    hub.status["/org/gated/resolve/main/m.gguf"] = 401
    r = run_cli("models", "pull", hub.base + "/org/gated/resolve/main/m.gguf", config=_config(tmp_path, tmp_path / "m"),
                env={"HF_TOKEN": "hf_do_not_print_me"})
    assert r.returncode == 1 and "HTTP 401" in r.stderr and "HF_TOKEN" in r.stderr
    assert "hf_do_not_print_me" not in r.stderr + r.stdout
    assert hub.requests[-1][2] == "Bearer hf_do_not_print_me"


def test_cli_interrupted_pull_keeps_the_partial_and_the_same_command_resumes(hub, model_bytes, tmp_path):
    import signal
    import time

    url = hub.add("o/r/resolve/main/t.gguf", model_bytes)
    cdn = hub.cdn(url)
    hub.stall[cdn] = 6000  # the transfer hangs after 6000 bytes, as on a dead network
    models = tmp_path / "models"
    cfg = _config(tmp_path, models)
    cmd = [sys.executable, "-m", "assistant", "--config", str(cfg), "models", "pull", url]
    # Ctrl-C as in a terminal: SIGINT at its default in the child, whatever the test run
    # inherited (a run started in the background, `nohup ... &`, has SIGINT ignored, and
    # an ignored signal stays ignored across exec).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    part = models / "t" / "t.gguf.part"
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size == 6000):
        assert time.monotonic() < deadline and proc.poll() is None, "the first 6000 bytes never reached the .part"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: what arrived is kept" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    assert leftovers(models / "t") == ["t.gguf.part", "t.gguf.part.json"]  # nothing under the final name

    r = run_cli("models", "pull", url, config=cfg)
    assert r.returncode == 0, r.stderr
    assert hub.hits(cdn)[-1][1] == "bytes=6000-"
    assert (models / "t" / "t.gguf").read_bytes() == model_bytes


def test_cli_unwritable_models_dir(hub, model_bytes, tmp_path):
    url = hub.add("o/r/resolve/main/t.gguf", model_bytes)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = run_cli("models", "pull", url, config=_config(tmp_path, blocker / "models"))
    assert r.returncode == 1 and "cannot write to" in r.stderr and "models_dir" in r.stderr
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        r = run_cli("models", "pull", url, config=_config(tmp_path, ro))
    else:  # root writes anywhere: a read-only file system it is
        r = _in_private_mount(tmp_path / "ro", "ro", ["models", "pull", url], tmp_path)
    assert r.returncode == 1 and "cannot write to" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_cli_file_size_limit_keeps_the_partial_and_a_rerun_resumes(hub, model_bytes, tmp_path):
    """A real write failure (EFBIG, as ENOSPC is handled): RLIMIT_FSIZE in the pulling process."""
    import resource

    url = hub.add("o/r/resolve/main/t.gguf", model_bytes)
    models = tmp_path / "models"
    cfg = _config(tmp_path, models)
    limit = 8192

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [sys.executable, "-m", "assistant", "--config", str(cfg), "models", "pull", url]
    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "file-size limit" in r.stderr and "run the pull again to resume" in r.stderr
    assert "Traceback" not in r.stderr
    assert leftovers(models / "t") == ["t.gguf.part", "t.gguf.part.json"]
    assert (models / "t" / "t.gguf.part").stat().st_size == limit
    assert not (models / PULLED_MANIFEST).exists()

    r = run_cli("models", "pull", url, config=cfg)
    assert r.returncode == 0, r.stderr
    assert "resuming at 8.0 KiB" in r.stderr
    assert hub.hits(hub.cdn(url))[-1][1] == f"bytes={limit}-"
    assert (models / "t" / "t.gguf").read_bytes() == model_bytes


def _in_private_mount(directory: Path, options: str, args: list[str], tmp_path: Path,
                      after: str = "") -> subprocess.CompletedProcess:
    """Run the CLI with a tmpfs mounted (``options``) on ``directory`` as its models dir, in a private
    mount namespace (nothing is left mounted). Needs root and unshare; the test skips otherwise."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private tmpfs")
    directory.mkdir(exist_ok=True)
    cfg = _config(tmp_path, directory)
    script = f'mount -t tmpfs -o {options} tmpfs "$0" || exit 99; "$@"; rc=$?; {after} exit $rc'
    cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(directory),
           sys.executable, "-m", "assistant", "--config", str(cfg), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=os.environ.copy())
    if r.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    return r


def test_cli_full_disk_is_refused_before_writing_and_when_it_fills(hub, tmp_path):
    big = write_gguf(tmp_path / "big.gguf", {"general.architecture": "llama"},
                     {"pad": (np.zeros(64 * 1024, np.float32), "F32")}).read_bytes()  # 256 KiB
    url = hub.add("o/r/resolve/main/big.gguf", big)
    disk = tmp_path / "small-disk"
    # The server says how big the file is: refused before a byte is written.
    r = _in_private_mount(disk, "size=64k", ["models", "pull", url], tmp_path, after=f'ls -a "{disk}/big";')
    assert r.returncode == 1 and "not enough disk space for big.gguf" in r.stderr, r.stderr
    assert not {"big.gguf", "big.gguf.part"} & set(r.stdout.split())
    # It does not say (no Content-Length, no X-Linked-Size): the disk fills up while writing; the
    # part is kept for a resume, the final name never appears.
    url = hub.add("o/r/big.gguf", big, lfs=False)
    hub.no_length.add("/o/r/big.gguf")
    r = _in_private_mount(disk, "size=64k", ["models", "pull", url], tmp_path, after=f'ls -a "{disk}/big";')
    assert r.returncode == 1 and "the disk is full" in r.stderr and "Traceback" not in r.stderr, r.stderr
    names = r.stdout.split()
    assert "big.gguf.part" in names and "big.gguf" not in names


def test_progress_bar_on_a_terminal():
    from assistant.cli.pull import _Bar

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    bar = _Bar("model x.gguf", out)
    bar(0, 1000)
    bar(1000, 1000)
    bar.close()
    text = out.getvalue()
    assert "\rmodel x.gguf  [" in text and "100%" in text and "#" * 24 in text and text.endswith("\n")


# --------------------------------------------------------------------------
# End to end: pulled, then asked for by its alias through the real daemon


def test_a_pulled_model_answers_by_its_alias(hub, model_bytes, daemon_factory, isolated_home):
    """Pulled while the daemon runs: the next request naming the alias finds it (no restart)."""
    url = hub.add("org/tiny/resolve/main/tiny-chat.gguf", model_bytes)
    d = daemon_factory(config_text="threads: 1\ncontext: 256\npreload: false\n").start()
    r = run_cli("models", "pull", url, "--name", "tiny", config=d.config)
    assert r.returncode == 0, r.stderr
    assert models_dir(load_config(d.config)) == isolated_home / "data" / "assistant" / "models"
    r = run_cli("ask", "-m", "tiny", "-n", "4", "--temperature", "0", "--json", "hello",
                socket_path=d.socket, config=d.config)
    assert r.returncode == 0, r.stderr + d.stderr()
    reply = json.loads(r.stdout)
    assert reply["model"] == "tiny" and reply["stats"]["completion_tokens"] == 4
