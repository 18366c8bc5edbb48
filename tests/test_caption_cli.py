"""`captune caption` end to end through cli.main on a generated folder: every output format, filters, failures."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image
from serve_fixtures import tiny_model_dir  # noqa: F401  (fixture)

from captune.cli import main

GEN = ["--max-new-tokens", "4"]


@pytest.fixture()
def photos(tmp_path):
    """photos/a.png, photos/sub/b.jpg, photos/sub/c.png, a notes.txt that is not an image."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 20, 20)).save(root / "a.png")
    Image.new("RGB", (30, 40), (20, 200, 20)).save(root / "sub" / "b.jpg")
    Image.new("RGB", (50, 50), (20, 20, 200)).save(root / "sub" / "c.png")
    (root / "notes.txt").write_text("not an image")
    return root


def expected_paths(root):
    return [str(root / "a.png"), str(root / "sub" / "b.jpg"), str(root / "sub" / "c.png")]


def test_text_default_prints_one_caption_a_line_in_order(tiny_model_dir, photos, capsys):
    files = [str(photos / "sub" / "c.png"), str(photos / "a.png")]
    assert main(["-q", "caption", "--model", str(tiny_model_dir), *GEN, *files]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 2 and all(lines)
    # Same captions, same order as the tsv format reports for the same inputs: stdout holds captions only.
    assert main(["-q", "caption", "--model", str(tiny_model_dir), *GEN, "--format", "tsv", *files]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert rows == [[files[0], lines[0]], [files[1], lines[1]]]


def test_directory_is_recursive_sorted_and_filtered(tiny_model_dir, photos, capsys):
    assert main(["-q", "caption", "--model", str(tiny_model_dir), *GEN, "--format", "tsv", str(photos)]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == expected_paths(photos)
    assert main(["-q", "caption", "--model", str(tiny_model_dir), *GEN, "--format", "tsv", "--ext", "png", str(photos)]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == [
        str(photos / "a.png"), str(photos / "sub" / "c.png")]


def test_glob_and_jsonl_output_file(tiny_model_dir, photos, tmp_path, capsys):
    output = tmp_path / "captions.jsonl"
    code = main(["-q", "caption", "--model", str(tiny_model_dir), *GEN, "--format", "jsonl", "--output", str(output),
                 str(photos / "**" / "*.png")])
    assert code == 0
    assert capsys.readouterr().out == ""
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["path"] for r in records] == [str(photos / "a.png"), str(photos / "sub" / "c.png")]
    assert all(isinstance(r["caption"], str) and r["caption"] for r in records)
    assert not list(tmp_path.glob(".captions.jsonl.*"))  # no temporary file left behind


def test_csv_output_and_unreadable_file_exit_code(tiny_model_dir, photos, tmp_path, capsys):
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    output = tmp_path / "captions.csv"
    code = main(["-q", "caption", "--model", str(tiny_model_dir), *GEN, "--format", "csv", "--output", str(output),
                 str(photos), str(photos / "missing.jpg")])
    assert code == 1  # some inputs failed; the others are still written
    err = capsys.readouterr().err
    assert "broken.png" in err and "missing.jpg" in err and "2 input(s) failed" in err
    with open(output, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["path", "caption"]
    assert [row[0] for row in rows[1:]] == expected_paths(photos)


def test_nothing_to_caption_is_an_error(tiny_model_dir, tmp_path, capsys):
    assert main(["-q", "caption", "--model", str(tiny_model_dir), *GEN, str(tmp_path / "nope.png")]) == 2
    assert "no images to caption" in capsys.readouterr().err


def test_sidecar_never_overwrites_unless_asked(tiny_model_dir, photos, capsys):
    (photos / "a.txt").write_text("my own caption\n")
    assert main(["-q", "caption", "--model", str(tiny_model_dir), *GEN, "--format", "sidecar", str(photos)]) == 0
    err = capsys.readouterr().err
    assert "wrote 2, kept 1 existing" in err
    assert (photos / "a.txt").read_text() == "my own caption\n"
    written = (photos / "sub" / "b.txt").read_text()
    assert written.strip() and written.endswith("\n")
    assert (photos / "sub" / "c.txt").is_file()

    assert main(["-q", "caption", "--model", str(tiny_model_dir), *GEN, "--format", "sidecar", "--overwrite", str(photos)]) == 0
    assert "wrote 3, kept 0 existing" in capsys.readouterr().err
    assert (photos / "a.txt").read_text() != "my own caption\n"
    assert (photos / "sub" / "b.txt").read_text() == written  # same model, greedy: same caption


def test_sidecar_clash_and_output_flag_rejected(tiny_model_dir, photos, tmp_path, capsys):
    Image.new("RGB", (20, 20)).save(photos / "a.jpg")  # a.jpg and a.png both want a.txt
    assert main(["-q", "caption", "--model", str(tiny_model_dir), *GEN, "--format", "sidecar", str(photos)]) == 1
    assert "also belongs to" in capsys.readouterr().err
    assert main(["-q", "caption", "--model", str(tiny_model_dir), *GEN, "--format", "sidecar", "--output",
                 str(tmp_path / "x.txt"), str(photos)]) == 2


def test_progress_bar_goes_to_stderr(tiny_model_dir, photos, capsys):
    assert main(["caption", "--model", str(tiny_model_dir), *GEN, str(photos / "a.png")]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1 and "captioning" not in captured.out
    assert "captioning" in captured.err
