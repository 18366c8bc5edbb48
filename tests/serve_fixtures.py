"""Fixtures shared by the caption/serve tests: a saved tiny model and a live server on a free loopback port."""

from __future__ import annotations

import io
import socket
import threading
import time

import pytest
from PIL import Image


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny BLIP saved with save_pretrained (model + processor), as a user's RUN/best would be."""
    from captune.model import load_model_and_processor

    path = tmp_path_factory.mktemp("tiny_model")
    model, processor = load_model_and_processor("tiny")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def png_bytes(colour=(200, 30, 30), size=(48, 40), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


class LiveServer:
    """uvicorn serving an app in a background thread, bound to 127.0.0.1 on a port the OS picked."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture(scope="module")
def live_server(tiny_model_dir):
    """`captune serve`'s app over the tiny model, with a 1 MB upload limit and 1M-pixel limit to test against."""
    from captune import Captioner
    from captune.serve import ServeLimits, create_app

    captioner = Captioner.load(tiny_model_dir, device="cpu", max_new_tokens=5)
    limits = ServeLimits(max_upload_bytes=1024 * 1024, max_pixels=1_000_000, max_images=4, max_batch_size=8,
                         batch_wait_s=0.005)
    with LiveServer(create_app(captioner, limits)) as server:
        yield server
