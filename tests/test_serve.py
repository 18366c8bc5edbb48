"""`captune serve` over HTTP on a free loopback port: API answers, bad uploads get 4xx JSON, a bounded load test."""

from __future__ import annotations

import http.client
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_fixtures import live_server, png_bytes, tiny_model_dir  # noqa: F401  (fixtures)

from captune.cli import build_parser


@pytest.fixture(scope="module")
def client(live_server):
    with httpx.Client(base_url=live_server.url, timeout=60) as session:
        yield session


def upload(name="a.png", data=None, kind="image/png"):
    return ("images", (name, png_bytes() if data is None else data, kind))


def test_health_page_and_openapi(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["device"] == "cpu" and health["int8"] is False
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text
    assert "http" not in page.text.split("<script>")[1]  # no external assets: works offline
    assert "default-src 'none'" in page.headers["content-security-policy"]
    spec = client.get("/openapi.json").json()
    assert "/v1/caption" in spec["paths"] and "/health" in spec["paths"]
    body = spec["paths"]["/v1/caption"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    fields = spec["components"]["schemas"][body.split("/")[-1]]["properties"]
    assert {"images", "num_beams", "max_new_tokens", "do_sample"} <= set(fields)


def test_health_names_the_model_and_answers_head(client, tiny_model_dir):
    health = client.get("/health").json()
    assert health["model"] == str(tiny_model_dir) and health["family"] == "blip" and health["step"] is None
    head = client.head("/health")
    assert head.status_code == 200 and head.content == b""


def test_each_request_is_logged_in_one_line(client, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="captune"):
        assert client.post("/v1/caption", files=[upload("a.png")]).status_code == 200
        assert client.post("/v1/caption", files=[upload("notes.txt", b"hi", "text/plain")]).status_code == 415
        assert client.head("/health").status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "captune"]
    assert len(lines) == 3, lines
    assert lines[0].startswith("POST /v1/caption 200 ") and lines[0].endswith(" 127.0.0.1")
    assert lines[1].startswith("POST /v1/caption 415 ") and lines[2].startswith("HEAD /health 200 ")


def test_health_reports_the_step_a_trained_model_was_saved_at(tiny_model_dir, tmp_path):
    import json
    import shutil

    from fastapi.testclient import TestClient

    from captune import Captioner
    from captune.serve import create_app

    model = tmp_path / "best"
    shutil.copytree(tiny_model_dir, model)
    (model / "captune.json").write_text(json.dumps({"step": 12, "generation": {"num_beams": 1}}))
    with TestClient(create_app(Captioner.load(model, device="cpu"))) as local:
        assert local.get("/health").json()["step"] == 12
        assert '"step": 12' in local.get("/").text  # the page's model line gets it too


def test_caption_several_images_matches_python_api(client, tiny_model_dir):
    from captune import Captioner

    jpeg = png_bytes((20, 160, 40), (64, 48), fmt="JPEG")
    reply = client.post("/v1/caption", files=[upload("a.png"), upload("b.jpg", jpeg, "image/jpeg")],
                        data={"num_beams": "2"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert [c["filename"] for c in body["captions"]] == ["a.png", "b.jpg"]
    assert (body["captions"][1]["width"], body["captions"][1]["height"]) == (64, 48)
    assert body["options"]["num_beams"] == 2 and body["options"]["max_new_tokens"] == 5
    local = Captioner.load(tiny_model_dir, device="cpu", max_new_tokens=5)
    assert [c["caption"] for c in body["captions"]] == local.caption([png_bytes(), jpeg], num_beams=2)


@pytest.mark.parametrize("preset, family", [("tiny-blip2", "blip-2"), ("tiny-git", "git"), ("tiny-smolvlm", "idefics3")])
def test_other_families_serve_what_the_python_api_captions(preset, family):
    """BLIP-2 and GIT behind the same app (in-process, no socket: the HTTP layer is BLIP's, tested above): /health
    names the family, and two uploads of different formats and sizes, batched in one request with beam search, get
    the captions `Captioner.caption` gives."""
    from fastapi.testclient import TestClient

    from captune import Captioner
    from captune.serve import create_app

    captioner = Captioner.load(preset, device="cpu", max_new_tokens=5)
    jpeg = png_bytes((20, 160, 40), (64, 48), fmt="JPEG")
    with TestClient(create_app(captioner)) as local:
        assert local.get("/health").json()["family"] == family
        reply = local.post("/v1/caption", files=[upload("a.png"), upload("b.jpg", jpeg, "image/jpeg")],
                           data={"num_beams": "2"})
    assert reply.status_code == 200, reply.text
    served = [c["caption"] for c in reply.json()["captions"]]
    assert any(served) and served == captioner.caption([png_bytes(), jpeg], num_beams=2)


@pytest.mark.parametrize("files, data, status, message", [
    ([upload("notes.txt", b"hello, not an image", "text/plain")], {}, 415, "not an image"),
    ([upload("notes.png", b"hello, not an image")], {}, 415, "not a supported image"),
    ([upload("cut.png", png_bytes((1, 2, 3), (300, 300))[:200])], {}, 400, "cannot decode"),
    ([upload("empty.png", b"")], {}, 400, "empty"),
    ([upload("big.png", png_bytes(size=(1200, 1000)))], {}, 413, "pixel limit"),
    ([upload("huge.png", b"\0" * (1024 * 1024 + 10))], {}, 413, "too large"),
    ([upload()] * 5, {}, 413, "limit is 4"),
    ([upload()], {"num_beams": "99"}, 422, "num_beams"),
    ([upload()], {"min_new_tokens": "9"}, 422, "min_new_tokens"),
    ([], {"images": "a string"}, 422, "images"),
])
def test_bad_uploads_get_4xx_json(client, files, data, status, message):
    reply = client.post("/v1/caption", files=files or None, data=data)
    assert reply.status_code == status, reply.text
    assert message in reply.json()["error"]


def test_a_valid_image_sent_as_text_is_refused(client):
    """Kills "serve: any content type accepted" (tools/mutants.py): a valid PNG declared text/plain is refused by
    the content-type check itself (the other 415 rows are not images, so Pillow alone refuses them too)."""
    reply = client.post("/v1/caption", files=[upload("photo.png", png_bytes(), "text/plain")])
    assert reply.status_code == 415 and "content type text/plain is not an image" in reply.json()["error"]
    assert client.post("/v1/caption", files=[upload("photo.png", png_bytes(), "image/png")]).status_code == 200


def test_empty_and_malformed_bodies(client):
    empty = client.post("/v1/caption", content=b"")
    assert empty.status_code == 422 and "images" in empty.json()["error"]
    garbage = client.post("/v1/caption", content=b"garbage",
                          headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert garbage.status_code == 400 and "error" in garbage.json()


def test_huge_declared_size_is_refused_before_reading(live_server):
    conn = http.client.HTTPConnection("127.0.0.1", live_server.port, timeout=10)
    conn.putrequest("POST", "/v1/caption")
    conn.putheader("Content-Type", "multipart/form-data; boundary=x")
    conn.putheader("Content-Length", str(10**12))
    conn.endheaders()
    conn.send(b"--x")
    reply = conn.getresponse()
    assert reply.status == 413 and b"too large" in reply.read()
    conn.close()


def test_server_survives_bad_uploads(client):
    client.post("/v1/caption", files=[upload("cut.png", png_bytes()[:30])])
    assert client.post("/v1/caption", files=[upload()]).status_code == 200


def test_load_concurrent_requests_are_batched(client):
    before = client.get("/stats").json()
    image = png_bytes((90, 90, 20), (64, 64))

    def one(i):
        started = time.perf_counter()
        reply = client.post("/v1/caption", files=[upload(f"{i}.png", image)])
        return reply.status_code, time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(300)))
    elapsed = time.perf_counter() - started
    latencies = sorted(seconds for _, seconds in results)
    stats = client.get("/stats").json()
    p50, p95 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.95)]
    print(f"\nload: 300 requests, 8 concurrent, {elapsed:.2f} s, {300 / elapsed:.1f} req/s, "
          f"p50 {p50 * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, mean {statistics.mean(latencies) * 1000:.1f} ms, "
          f"batches {stats['batches'] - before['batches']}, batch sizes {stats['batch_sizes']}")
    assert [status for status, _ in results] == [200] * 300
    assert stats["images"] - before["images"] == 300
    assert stats["max_batch_size_seen"] > 1  # concurrent requests shared generate() calls


def test_serve_binds_loopback_by_default():
    args = build_parser().parse_args(["serve", "--model", "tiny"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)


def test_captune_serve_command_starts_and_answers(tiny_model_dir):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    server = subprocess.Popen([sys.executable, "-m", "captune", "serve", "--model", str(tiny_model_dir), "--port",
                               str(port), "--device", "cpu"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "captune serve did not answer within 120 s"
                time.sleep(0.2)
        assert health.json()["status"] == "ok"
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/caption", files=[upload()], data={"max_new_tokens": "3"},
                           timeout=60)
        assert reply.status_code == 200 and reply.json()["captions"][0]["caption"]
    finally:
        server.terminate()
        server.wait(timeout=30)
