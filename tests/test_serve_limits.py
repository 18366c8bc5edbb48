"""`captune serve` under hostile load: memory stays bounded for pixel-heavy requests, and slow or idle clients are
timed out and capped so /health keeps answering (issue 14, items 13-14). Both failed on the code before the fix:
the first request below grew the server by gigabytes, and the slow clients made /health unreachable."""

from __future__ import annotations

import io
import json
import os
import resource
import socket
import subprocess
import sys
import time

import httpx
from PIL import Image
from serve_fixtures import tiny_model_dir  # noqa: F401  (fixture)

SIDE = 6300  # 39.7M pixels: under the default 40M-pixel limit
PEAK_BOUND_MB = 600
READ_TIMEOUT = 4

MEASURE = r"""
import io, json, resource, sys
from fastapi.testclient import TestClient
from PIL import Image
from captune import Captioner
from captune.serve import ServeLimits, create_app

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

captioner = Captioner.load(sys.argv[1], device="cpu", max_new_tokens=3)
client = TestClient(create_app(captioner, ServeLimits()))
with client:
    small = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(small, "PNG")
    assert client.post("/v1/caption", files=[("images", ("s.png", small.getvalue(), "image/png"))]).status_code == 200
    big = io.BytesIO()
    Image.new("1", (%(side)d, %(side)d), 1).save(big, "PNG", optimize=True)
    before = peak_mb()
    reply = client.post("/v1/caption", files=[("images", (f"{i}.png", big.getvalue(), "image/png")) for i in range(16)])
    print(json.dumps({"status": reply.status_code, "body": reply.json(), "before": before, "after": peak_mb(),
                      "upload_bytes": 16 * len(big.getvalue())}))
""" % {"side": SIDE}


def test_sixteen_large_one_bit_pngs_keep_peak_memory_bounded(tiny_model_dir):
    """16 x a 6300x6300 1-bit PNG (~5 KB each) in one request. Before: the server grew by several GB (7.6 GB RSS
    measured with the real model). The peak RSS growth over the warmed-up server must stay under PEAK_BOUND_MB."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tiny_model_dir)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == 200, result["body"]
    captions = result["body"]["captions"]
    assert len(captions) == 16 and all(c["caption"] for c in captions)
    assert {(c["width"], c["height"]) for c in captions} == {(SIDE, SIDE)}  # the upload's size, not the shrunk one
    growth = result["after"] - result["before"]
    assert growth < PEAK_BOUND_MB, f"peak RSS grew {growth:.0f} MB for a {result['upload_bytes']}-byte request"


def test_slow_clients_are_timed_out_and_capped_and_health_still_answers(tiny_model_dir):
    """200 connections that send half a request header, against a server allowed 160 file descriptors. Before:
    accept() failed with `Too many open files` (tracebacks in the log) and /health never answered."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))

    def few_descriptors():
        resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))

    server = subprocess.Popen([sys.executable, "-m", "captune", "serve", "--model", str(tiny_model_dir), "--port",
                               str(port), "--device", "cpu", "--read-timeout", str(READ_TIMEOUT), "--max-connections", "64"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=few_descriptors)
    url = f"http://127.0.0.1:{port}"
    slow: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                httpx.get(f"{url}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "captune serve did not start within 120 s"
                time.sleep(0.2)

        opened = time.monotonic()
        for _ in range(200):  # bounded: 200 connections, loopback only
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            client.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # never finished
            slow.append(client)
        opening = time.monotonic() - opened

        # /health answers once the stalled connections time out (bounded: 20 s).
        answered = None
        stop = time.monotonic() + 20
        while time.monotonic() < stop and answered is None:
            try:
                reply = httpx.get(f"{url}/health", timeout=1)
                if reply.status_code == 200:
                    answered = time.monotonic()
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert answered is not None, "/health did not answer within 20 s"

        # Every slow connection was answered (503 past the cap, 408 after the header deadline) and closed.
        statuses = []
        for client in slow:
            client.settimeout(5)
            data = b""
            try:
                while chunk := client.recv(4096):
                    data += chunk
            except OSError:
                pass
            statuses.append(data.split(b" ", 2)[1] if data.startswith(b"HTTP/1.1 ") else data[:20])
        assert set(statuses) <= {b"408", b"503"}, set(statuses)
        assert statuses.count(b"408") >= 1
        if opening < READ_TIMEOUT - 1:  # all 200 were open together (not so on a heavily loaded machine)
            assert statuses.count(b"503") >= 1
    finally:
        for client in slow:
            client.close()
        server.terminate()
        log = server.communicate(timeout=30)[0]
    assert "Traceback" not in log and "Too many open files" not in log, log[-3000:]
