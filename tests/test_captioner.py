"""The Python API: Captioner.load(path).caption(images), and that `import captune` stays light."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image
from serve_fixtures import png_bytes, tiny_model_dir  # noqa: F401  (fixture)

from captune import Captioner
from captune.errors import CaptuneError
from captune.generate import GenerationOptions, caption_images


def test_import_captune_does_not_import_torch():
    code = "import sys, captune; assert 'torch' not in sys.modules, 'torch imported'; print(captune.Captioner.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Captioner"


def test_caption_accepts_pil_paths_and_bytes_alike(tiny_model_dir, tmp_path):
    captioner = Captioner.load(tiny_model_dir, device="cpu")
    data = png_bytes((10, 120, 200))
    path = tmp_path / "blue.png"
    path.write_bytes(data)
    image = Image.open(path).convert("RGB")
    captions = captioner.caption([image, path, str(path), data], max_new_tokens=6)
    expected = caption_images(captioner.model, captioner.processor, [image], GenerationOptions(max_new_tokens=6))[0]
    assert captions == [expected] * 4
    assert captioner.caption(image, max_new_tokens=6) == [expected]  # one image still gives a list


def test_caption_options_and_errors(tiny_model_dir):
    captioner = Captioner.load(tiny_model_dir, device="cpu")
    short = captioner.caption(png_bytes(), max_new_tokens=1)[0]
    assert len(short.split()) <= 1
    assert captioner.caption(png_bytes(), GenerationOptions(max_new_tokens=1)) == [short]
    with pytest.raises(CaptuneError, match="unknown generation option"):
        captioner.caption(png_bytes(), beams=3)
    with pytest.raises(CaptuneError, match="min_new_tokens"):
        captioner.caption(png_bytes(), min_new_tokens=9, max_new_tokens=2)
    with pytest.raises(CaptuneError, match="not a readable image"):
        captioner.caption(b"not an image")


def test_defaults_come_from_the_model_directory(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "best"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "captune.json").write_text(json.dumps({"prompt": "a picture of ", "generation": {"num_beams": 3}}))
    captioner = Captioner.load(model_dir, device="cpu", max_new_tokens=4)
    assert (captioner.defaults.num_beams, captioner.defaults.prompt, captioner.defaults.max_new_tokens) == (3, "a picture of ", 4)
    assert captioner.options(num_beams=1).num_beams == 1
