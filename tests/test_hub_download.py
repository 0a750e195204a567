"""Hub models for real: a tiny model repository served over HTTP on 127.0.0.1 in the Hugging Face
hub's URL layout, HF_ENDPOINT pointed at it, and `resolve_model("org/tiny")` downloading it with the
real huggingface_hub (issue 13, item 3).

The server speaks the few endpoints snapshot_download uses:

    GET  /api/models/<repo>/revision/<rev>   {"sha": ..., "siblings": [{"rfilename": ...}]}
    GET  /api/models/<repo>/tree/<commit>    [{"type": "file", "path": ..., "size": ..., "oid": ...}]
    HEAD /<repo>/resolve/<commit>/<file>     X-Repo-Commit, ETag, Content-Length
    GET  /<repo>/resolve/<commit>/<file>     the bytes

Each resolve runs in a subprocess: huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE at
import time, so a fresh interpreter is the only faithful way to point it at this server.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SHA = "0123456789abcdef0123456789abcdef01234567"
TINY, MISSING, GATED, BROKEN = "org/tiny", "org/missing", "org/gated", "org/broken"


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory):
    import tiny
    d = str(tmp_path_factory.mktemp("hub_repo"))
    tok = tiny.make_tokenizer(str(tmp_path_factory.mktemp("hub_tok")))
    tiny.make_model("llama").save_pretrained(d, safe_serialization=True)
    for name in os.listdir(tok):
        shutil.copy(os.path.join(tok, name), d)
    with open(os.path.join(d, "README.md"), "w") as f:  # not in HUB_FILES: must not be downloaded
        f.write("# tiny\n")
    return d


class HubServer:
    """A minimal hub: TINY and BROKEN serve repo_dir (BROKEN cuts model.safetensors short),
    GATED answers 401 GatedRepo, anything else 404 RepoNotFound."""

    def __init__(self, root: str):
        self.root = root
        self.requests: list[tuple[str, str]] = []
        files = sorted(os.listdir(root))
        self.files = {n: open(os.path.join(root, n), "rb").read() for n in files}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                server.handle(self, head=True)

            def do_GET(self):
                server.handle(self, head=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def _send(h, status, body=b"", headers=None, head=False, ctype="application/json"):
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def handle(self, h, head):
        path = unquote(urlparse(h.path).path)
        self.requests.append((h.command, path))
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/"):]
            org, name, *tail = rest.split("/")
            repo = f"{org}/{name}"
        else:
            org, name, *tail = path.lstrip("/").split("/")
            repo = f"{org}/{name}"
        if repo == GATED:
            return self._send(h, 401, b'{"error": "gated"}',
                              {"X-Error-Code": "GatedRepo",
                               "X-Error-Message": "Access to model org/gated is restricted."}, head)
        if repo not in (TINY, BROKEN):
            return self._send(h, 404, b'{"error": "Repository not found"}',
                              {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, head)
        if path.startswith("/api/models/") and tail[:1] == ["revision"]:
            body = {"id": repo, "modelId": repo, "sha": SHA, "private": False,
                    "siblings": [{"rfilename": n} for n in self.files]}
            return self._send(h, 200, json.dumps(body).encode(), head=head)
        if path.startswith("/api/models/") and tail[:1] == ["tree"]:
            body = [{"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for n, b in self.files.items()]
            return self._send(h, 200, json.dumps(body).encode(), head=head)
        if tail[:1] == ["resolve"] and len(tail) == 3 and tail[2] in self.files:
            data = self.files[tail[2]]
            headers = {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Accept-Ranges": "bytes"}
            if repo == BROKEN and tail[2] == "model.safetensors" and not head:
                if h.headers.get("Range"):  # a resume attempt: drop the connection at once
                    h.close_connection = True
                    return
                h.send_response(200)
                h.send_header("Content-Type", "application/octet-stream")
                h.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    h.send_header(k, v)
                h.end_headers()
                h.wfile.write(data[:len(data) // 3])  # then the connection closes mid-body
                h.wfile.flush()
                h.close_connection = True
                return
            return self._send(h, 200, data, headers, head, ctype="application/octet-stream")
        return self._send(h, 404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"}, head)


@pytest.fixture
def hub(repo_dir):
    server = HubServer(repo_dir)
    yield server
    server.stop()


SCRIPT = """
import json, sys
from conflayers.compiler.models import ModelResolutionError, resolve_model
try:
    r = resolve_model(sys.argv[1], progress=False)
    print(json.dumps({"source": r.source, "path": r.path, "name": r.name}))
except ModelResolutionError as e:
    print(json.dumps({"error": str(e)}))
"""


def hub_env(tmp_path, endpoint, offline=False):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k.lower() not in
           ("https_proxy", "http_proxy", "all_proxy", "transformers_offline", "hf_datasets_offline")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
               CONFLAYERS_CACHE=str(tmp_path / "conflayers"), HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", HF_HUB_ETAG_TIMEOUT="5",
               HF_HUB_DOWNLOAD_TIMEOUT="5", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def resolve(spec, env, timeout=60):
    """resolve_model(spec) in a fresh process (huggingface_hub reads its environment at import).
    The timeout guards against a hang; the failures themselves are fast by mechanism (the
    reachability probe, HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT of 5 s), not by timing."""
    proc = subprocess.run([sys.executable, "-c", SCRIPT, spec], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, proc.stdout + proc.stderr[-3000:]
    return json.loads(lines[-1]), proc.stderr


def incomplete_files(tmp_path):
    return glob.glob(str(tmp_path / "hf" / "**" / "*.incomplete"), recursive=True)


def test_hub_model_downloads_caches_and_resolves_offline(hub, tmp_path):
    out, err = resolve(TINY, hub_env(tmp_path, hub.endpoint))
    assert "error" not in out, out["error"]
    assert out["source"] == f"hf:{TINY}@{SHA}"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.isfile(os.path.join(out["path"], name)), name
    assert not os.path.exists(os.path.join(out["path"], "README.md"))  # allow_patterns honoured
    assert out["path"].startswith(str(tmp_path / "hf" / "hub"))
    with open(os.path.join(out["path"], "model.safetensors"), "rb") as f:
        assert f.read() == hub.files["model.safetensors"]
    assert ("GET", f"/api/models/{TINY}/revision/main") in hub.requests
    assert not incomplete_files(tmp_path)

    hub.stop()  # the hub is gone: the local HF cache must answer
    again, err = resolve(TINY, hub_env(tmp_path, hub.endpoint, offline=True))
    assert "error" not in again, again["error"]
    assert again["source"] == out["source"] and again["path"] == out["path"]


def test_hub_model_resolves_from_cache_when_the_hub_is_unreachable(hub, tmp_path):
    out, _ = resolve(TINY, hub_env(tmp_path, hub.endpoint))
    assert "error" not in out, out["error"]
    endpoint = hub.endpoint
    hub.stop()  # no HF_HUB_OFFLINE: the reachability probe must notice and use the cache
    again, _ = resolve(TINY, hub_env(tmp_path, endpoint))
    assert "error" not in again, again["error"]
    assert again["source"] == out["source"]


@pytest.mark.parametrize("spec, pattern", [
    (MISSING, "no such model"),
    (GATED, "gated"),
    (BROKEN, "download.*failed"),
])
def test_hub_errors_are_clear_fast_and_leave_no_half_cache(hub, tmp_path, spec, pattern):
    import re
    out, err = resolve(spec, hub_env(tmp_path, hub.endpoint))
    assert "error" in out, out
    assert re.search(pattern, out["error"], re.I), out["error"]
    assert spec in out["error"]
    if spec == GATED:
        assert "log in" in out["error"]
    if spec == BROKEN:  # the body really was cut short, and resumes were refused
        assert ("GET", f"/{BROKEN}/resolve/{SHA}/model.safetensors") in hub.requests
        assert hub.requests.count(("GET", f"/{BROKEN}/resolve/{SHA}/model.safetensors")) >= 2
    assert not incomplete_files(tmp_path), incomplete_files(tmp_path)
    # nothing half-downloaded may pass for the model: an offline resolve must still fail
    again, _ = resolve(spec, hub_env(tmp_path, hub.endpoint, offline=True))
    assert "error" in again, again


def test_hub_unreachable_and_not_cached_fails_fast(tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    out, _ = resolve(TINY, hub_env(tmp_path, f"http://127.0.0.1:{port}"))
    assert "error" in out, out
    assert "not reachable" in out["error"] and "not in the local HF cache" in out["error"], out["error"]
