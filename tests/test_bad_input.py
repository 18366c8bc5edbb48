"""Dirty input: odd image modes decoded right, bad samples named by `captune check` and skipped by training."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from captune.cli import main
from captune.data import build_dataset
from captune.data.records import load_rgb
from captune.errors import CaptuneError

from datafiles import BAD_CASES, BAD_LINES, bad_folder, png


def _decoded(image: Image.Image, fmt: str = "PNG", **save) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return load_rgb(buffer.getvalue())


def test_modes_convert_to_rgb():
    cmyk = _decoded(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG", quality=100)  # pure red in CMYK
    assert cmyk.mode == "RGB" and cmyk.getpixel((1, 1))[0] > 240 and cmyk.getpixel((1, 1))[1] < 20
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    palette.putpixel((0, 0), 1)
    rgb = _decoded(palette, transparency=0)  # index 0 (black) transparent: composited on white
    assert rgb.getpixel((3, 3)) == (255, 255, 255) and rgb.getpixel((0, 0)) == (10, 200, 10)
    la = Image.new("LA", (4, 4), (0, 0))
    la.putpixel((0, 0), (50, 255))
    rgb = _decoded(la)
    assert rgb.getpixel((2, 2)) == (255, 255, 255) and rgb.getpixel((0, 0)) == (50, 50, 50)
    assert _decoded(Image.new("L", (4, 4), 77)).getpixel((0, 0)) == (77, 77, 77)


def test_16_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)  # mode I;16
    assert image.mode == "I;16"
    rgb = _decoded(image)
    # 1000 would clip to 255 with a plain convert; scaled it is 1000/257 ~ 4.
    assert [rgb.getpixel((x, 0))[0] for x in range(4)] == [0, 4, 128, 255]


def test_exif_orientation_and_animation(tmp_path):
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    assert _decoded(wide, "JPEG", exif=exif).size == (20, 40)
    frames = [Image.new("RGB", (8, 8), c) for c in ((0, 0, 255), (255, 0, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    first = load_rgb(buffer.getvalue())
    assert first.getpixel((0, 0))[2] > 200 and first.getpixel((0, 0))[0] < 50  # the first (blue) frame


def test_pixel_limit_is_configurable(tmp_path):
    path = png(tmp_path / "big.png", size=(100, 100))
    assert load_rgb(path).size == (100, 100)
    with pytest.raises(CaptuneError, match=r"big.png: image is 100x100 = 10,000 pixels, over the limit of 5,000"):
        load_rgb(path, str(path), max_pixels=5_000)


def test_jpeg_draft_decodes_smaller_but_not_below_size():
    buffer = io.BytesIO()
    Image.new("RGB", (1024, 768), (0, 128, 0)).save(buffer, "JPEG")
    drafted = load_rgb(buffer.getvalue(), draft_size=128)
    assert drafted.size == (256, 192)  # 1/4 scale: the smallest with both sides >= 128 is 1/4 (1/8 gives 96)


def test_strict_reading_names_the_first_bad_row(tmp_path):
    root = bad_folder(tmp_path / "data")
    with pytest.raises(CaptuneError, match=r"metadata.jsonl:\d+: "):
        build_dataset(root)


def test_check_names_every_problem(tmp_path, capsys):
    root = bad_folder(tmp_path / "data")
    code = main(["check", str(root), "--max-image-pixels", "5000", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    reasons = [f"{p['where']}: {p['reason']}" for p in report["problems"]]
    for name, message in BAD_CASES.items():
        assert any(name.split("/")[-1] in r and message in r for r in reasons), (name, reasons)
    for message in BAD_LINES.values():
        assert any(message in r and "metadata.jsonl:" in r for r in reasons), (message, reasons)
    assert report["errors"] == len(BAD_CASES) + len(BAD_LINES)
    assert report["splits"]["train"] == {"images": 4, "captions": 4}
    # Rows of the metadata are named with their line: file_name rows start at line 1.
    assert any(r.startswith(f"{root}/metadata.jsonl:5: ") for r in reasons)


def test_check_clean_dataset_and_text_report(tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    png(root / "a.png")
    (root / "b.png").write_bytes((root / "a.png").read_bytes())  # an exact duplicate
    (root / "metadata.csv").write_text('\ufefffile_name,text\na.png,"a red, flat ""thing"""\nb.png,'
                                       + '"' + "word " * 50 + '"\n', encoding="utf-8")
    assert main(["check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "2 images" in out and "ok: no errors" in out
    assert "duplicate images (same bytes): train:a.png, train:b.png" in out
    assert "1 over max_caption_tokens=40" in out


def test_training_skips_and_counts_bad_samples(tmp_path):
    root = bad_folder(tmp_path / "data")
    run = tmp_path / "run"
    code = main(["-q", "train", "--data", str(root), "--model", "tiny", "--output", str(run), "--epochs", "1",
                 "--batch-size", "4", "--num-workers", "2", "--set", "data.max_image_pixels=5000",
                 "--set", "train.log_every_steps=1"])
    assert code == 0
    skipped = json.loads((run / "summary.json").read_text())["skipped_samples"]
    reasons = [s["reason"] for s in skipped]
    for name, message in BAD_CASES.items():
        assert any(name.split("/")[-1] in r and message in r for r in reasons), (name, reasons)
    for message in BAD_LINES.values():
        assert any(message in r for r in reasons), (message, reasons)
    assert len(skipped) == len(BAD_CASES) + len(BAD_LINES)


def test_training_on_bad_sample_error_stops_with_a_message(tmp_path, capsys):
    root = bad_folder(tmp_path / "data")
    code = main(["-q", "train", "--data", str(root), "--model", "tiny", "--output", str(tmp_path / "run"),
                 "--max-steps", "1", "--on-bad-sample", "error", "--num-workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("captune: error: ") and "metadata.jsonl:" in err and "Traceback" not in err


def test_unreadable_validation_image_is_left_out_not_fatal(tmp_path, synthetic_dir, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_dir, root)
    broken = sorted((root / "validation").glob("*.png"))[0]
    broken.write_bytes(b"not a png at all")
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--model", "tiny", "--output", str(run), "--max-steps", "2",
                 "--batch-size", "16", "--num-workers", "0", "--set", "eval.num_beams=1",
                 "--set", "eval.max_new_tokens=4", "--set", "eval.min_new_tokens=0"]) == 0
    assert "left out of evaluation: " in capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_metrics"]["unreadable_images"] == 1
    records = [json.loads(line) for line in (run / "val_predictions.jsonl").read_text().splitlines()]
    assert len(records) == 16
    assert [r["prediction"] for r in records if r["id"] == broken.name] == [None]
    assert all(isinstance(r["prediction"], str) for r in records if r["id"] != broken.name)


def test_evaluation_item_reports_any_decoder_failure():
    from captune.data.collate import CaptionImages
    from captune.data.records import CaptionSample

    item = CaptionImages([CaptionSample(id="x", captions=("a",), image=None, origin="row 3")])[0]
    assert item["image"] is None and item["problem"].startswith("row 3")
