"""Bad input gets a one-line error naming what, where and how to fix it, and one bad row never hides the others
(issue 14, items 15-17). Every test here failed on the code before the fix (noted per test)."""

from __future__ import annotations

import json
import os
import stat
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
from serve_fixtures import tiny_model_dir  # noqa: F401  (fixture)

from captune.cli import main
from captune.data import build_dataset
from datafiles import COLOURS, jpeg_bytes, png, write_jsonl

GEN = ["--max-new-tokens", "3"]


def last_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "unexpected" not in err, err
    return err.splitlines()[-1]


# --- 15: every problem in one pass --------------------------------------------------------------------------------

@pytest.fixture
def messy(tmp_path) -> Path:
    """train/: 3 good rows and one of each bad kind; validation/: an empty metadata file."""
    root = tmp_path / "messy"
    (root / "train").mkdir(parents=True)
    (root / "validation").mkdir()
    rows = []
    for i in range(3):
        png(root / "train" / f"good{i}.png", COLOURS[i])
        rows.append({"file_name": f"good{i}.png", "text": f"a good picture {i}"})
    png(root / "train" / "number.png")
    rows += [{"file_name": "number.png", "text": 42},
             {"file_name": "nul\u0000.png", "text": "a name with a NUL byte"},
             {"text": "a row without its file"},
             {"file_name": "good0.png", "caption_typo": "no caption column on this row"}]
    write_jsonl(root / "train" / "metadata.jsonl", rows)
    with open(root / "train" / "metadata.jsonl", "ab") as handle:
        handle.write(b'{"file_name": "good1.png", "text": "caf\xe9 latin-1"}\n')
    (root / "validation" / "metadata.jsonl").write_text("")
    return root


MESSY_PROBLEMS = ["train/metadata.jsonl:4: caption 42 is a int, not text",
                  "train/metadata.jsonl:5: file_name 'nul\\x00.png' contains a NUL byte",
                  "train/metadata.jsonl:6: no file_name",
                  "train/metadata.jsonl:7: no caption",
                  "train/metadata.jsonl:8: not UTF-8",
                  "validation/metadata.jsonl: has no rows: this split is empty"]


def test_check_lists_every_problem_in_one_pass(messy, capsys):
    """Before: `unexpected TypeError` on the numeric caption, naming no file, and nothing else listed."""
    assert main(["check", str(messy)]) == 1
    out = capsys.readouterr().out
    for problem in MESSY_PROBLEMS:
        assert problem in out, problem
    assert "3 images" in out and f"{len(MESSY_PROBLEMS)} error(s)" in out


def test_training_skips_bad_rows_and_counts_them(messy, tmp_path):
    """Before: training stopped with `unexpected TypeError` (and the empty validation split alone refused all)."""
    data = build_dataset(messy, strict=False)
    assert sorted(s.id for s in data.train) == ["good0.png", "good1.png", "good2.png"]
    run = tmp_path / "run"
    assert main(["-q", "train", "--data", str(messy), "--model", "tiny", "--output", str(run), "--max-steps", "1",
                 "--batch-size", "4", "--num-workers", "0", "--report-to", "none"]) == 0
    skipped = json.loads((run / "summary.json").read_text())["skipped_samples"]
    assert len(skipped) == len(MESSY_PROBLEMS)


def test_strict_training_names_the_first_bad_row(messy, tmp_path, capsys):
    assert main(["train", "--data", str(messy), "--model", "tiny", "--output", str(tmp_path / "run"),
                 "--on-bad-sample", "error"]) == 2
    assert "train/metadata.jsonl:8: not UTF-8" in last_line(capsys)  # the whole file is decoded first


def test_numeric_captions_in_coco_and_webdataset_are_listed_problems(tmp_path, capsys):
    """Before: `unexpected TypeError: 'int' object is not iterable` from both readers."""
    (tmp_path / "coco").mkdir()
    for i in range(2):
        png(tmp_path / "coco" / f"{i}.png", COLOURS[i])
    (tmp_path / "coco" / "captions.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "0.png"}, {"id": 2, "file_name": "1.png"}],
        "annotations": [{"image_id": 1, "caption": "a real caption"}, {"image_id": 2, "caption": 42}]}))
    assert main(["check", str(tmp_path / "coco" / "captions.json")]) == 1
    assert "annotations[1]: caption 42 is a int, not text" in capsys.readouterr().out

    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for key, caption in (("a", "a real caption"), ("b", 42)):
            for name, data in ((f"{key}.jpg", jpeg_bytes()), (f"{key}.json", json.dumps({"caption": caption}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, __import__("io").BytesIO(data))
    assert main(["check", str(shard)]) == 1
    assert "shard.tar:b.json: caption 42 is a int, not text" in capsys.readouterr().out


def test_hf_split_without_its_caption_column_is_one_problem_among_the_others(tmp_path, capsys):
    """Before: the validation split's missing column refused the whole dataset, hiding the train split's problems."""
    import datasets
    from PIL import Image

    def images(n):
        return [Image.new("RGB", (16, 16), COLOURS[i]) for i in range(n)]

    train = datasets.Dataset.from_dict({"image": images(3), "text": ["a caption", "", "another caption"]},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "text": datasets.Value("string")}))
    validation = datasets.Dataset.from_dict({"image": images(2), "label": [0, 1]},
                                            features=datasets.Features({"image": datasets.Image(),
                                                                        "label": datasets.Value("int64")}))
    path = tmp_path / "saved"
    datasets.DatasetDict({"train": train, "validation": validation}).save_to_disk(str(path))
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "[train] row 1: empty caption" in out and "[validation]: no caption column" in out
    assert "2 images" in out and "2 error(s)" in out


def test_csv_without_a_caption_column_is_one_problem(tmp_path, capsys):
    root = tmp_path / "csv"
    root.mkdir()
    png(root / "a.png")
    (root / "metadata.csv").write_text("file_name,descr\na.png,a red square\n")
    assert main(["check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "metadata.csv:1: the header has no caption column" in out and "2 error(s)" in out  # + no train sample


def test_eval_skips_a_non_utf8_metadata_line_as_training_does(tiny_model_dir, tmp_path, capsys):
    """Before: eval refused the whole dataset over the one line that train skips."""
    root = tmp_path / "data"
    root.mkdir()
    rows = []
    for i in range(3):
        png(root / f"{i}.png", COLOURS[i])
        rows.append({"file_name": f"{i}.png", "text": f"picture {i}"})
    write_jsonl(root / "metadata.jsonl", rows)
    with open(root / "metadata.jsonl", "ab") as handle:
        handle.write(b'{"file_name": "0.png", "text": "caf\xe9"}\n')
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(root), "--output", str(out), *GEN]) == 0
    assert "metadata.jsonl:4: not UTF-8" in capsys.readouterr().err
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3


# --- 16: one-line errors -------------------------------------------------------------------------------------------

def train(data: Path, output, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--model", "tiny", "--output", str(output), "--report-to", "none", *extra]


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    png(root / "a.png")
    write_jsonl(root / "metadata.jsonl", [{"file_name": "a.png", "text": "a red square"}])
    return root


def test_train_output_that_is_a_file_or_not_writable(tiny_data, tmp_path, capsys):
    """Before: `unexpected FileExistsError` / `PermissionError` after loading the model."""
    afile = tmp_path / "results.txt"
    afile.write_text("keep me")
    assert main(train(tiny_data, afile)) == 2
    assert "is a file" in last_line(capsys)
    assert afile.read_text() == "keep me"
    if os.geteuid() == 0:  # root writes through permission bits: use a filesystem that refuses new directories
        unwritable = Path("/sys/captune-test-run")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        unwritable = locked / "run"
    assert main(train(tiny_data, unwritable)) == 2
    assert str(unwritable) in last_line(capsys)


def test_non_finite_lr_is_refused_at_config_time(tiny_data, tmp_path, capsys, monkeypatch):
    """Before: `nan <= 0` is False, so training ran on NaN weights."""
    import captune.train

    monkeypatch.setattr(captune.train, "load_model_and_processor", lambda *a, **k: pytest.fail("loaded a model"))
    for value in ("nan", "inf"):
        assert main(train(tiny_data, tmp_path / "run", "--lr", value)) == 2
        assert "train.lr must be a finite number" in last_line(capsys)


def test_scalar_for_a_section_is_refused(tiny_data, tmp_path, capsys):
    """Before: `--set train=0` silently reset every train.* key to its default."""
    assert main(train(tiny_data, tmp_path / "run", "--set", "train=0")) == 2
    assert "train is a section, not a value" in last_line(capsys)


def test_malformed_yaml_gives_line_and_column(tiny_data, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  lr: 1e-5\n   epochs: 3\n")
    assert main(train(tiny_data, tmp_path / "run", "--config", str(recipe))) == 2
    assert f"{recipe}:3:10: not valid YAML" in last_line(capsys)


def test_caption_output_that_is_a_directory_is_refused_before_captioning(tiny_model_dir, tmp_path, capsys,
                                                                        monkeypatch):
    """Before: every image was captioned, then the rename onto the directory failed and the captions were lost."""
    import captune.caption_files

    png(tmp_path / "a.png")
    monkeypatch.setattr(captune.caption_files, "_load", lambda path: pytest.fail("captioned before refusing"))
    assert main(["caption", "--model", str(tiny_model_dir), str(tmp_path / "a.png"), "--output",
                 str(tmp_path)]) == 2
    assert "is a directory" in last_line(capsys)


def png_header(width: int, height: int) -> bytes:
    """A 1-bit PNG that declares `width` x `height` and holds one row of pixels (Pillow decodes the rest as 0)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = zlib.compress(b"\x00" * (1 + width // 8))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


def test_max_image_pixels_above_pillows_own_limit_takes_effect(tmp_path, capsys):
    """Before: Pillow refused a 180M-pixel image as a decompression bomb however high --max-image-pixels was."""
    root = tmp_path / "big"
    root.mkdir()
    (root / "huge.png").write_bytes(png_header(15000, 12000))  # 180M pixels, past Pillow's 2 x 89.5M
    png(root / "ok.png")
    write_jsonl(root / "metadata.jsonl", [{"file_name": "huge.png", "text": "huge"},
                                          {"file_name": "ok.png", "text": "ok"}])
    assert main(["check", str(root)]) == 1
    assert "over the limit of 100,000,000" in capsys.readouterr().out
    assert main(["check", str(root), "--max-image-pixels", "200000000"]) == 0
    out = capsys.readouterr().out
    assert "ok: no errors" in out and "decompression bomb" not in out


# --- 17: file modes ------------------------------------------------------------------------------------------------

def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_follow_the_umask_and_overwrite_keeps_the_mode(tiny_model_dir, tmp_path):
    """Before: captions and sidecars were created 0600 (mkstemp) and --overwrite turned a 0644 file into 0600."""
    old = os.umask(0o022)
    try:
        for name in ("a.png", "b.png"):
            png(tmp_path / name)
        (tmp_path / "b.txt").write_text("old caption\n")
        os.chmod(tmp_path / "b.txt", 0o640)
        assert main(["-q", "caption", "--model", str(tiny_model_dir), *GEN, "--format", "sidecar", "--overwrite",
                     str(tmp_path / "a.png"), str(tmp_path / "b.png")]) == 0
        assert mode(tmp_path / "a.txt") == 0o644
        assert mode(tmp_path / "b.txt") == 0o640 and (tmp_path / "b.txt").read_text() != "old caption\n"
        out = tmp_path / "captions.tsv"
        assert main(["-q", "caption", "--model", str(tiny_model_dir), *GEN, "--format", "tsv", "--output", str(out),
                     str(tmp_path / "a.png")]) == 0
        assert mode(out) == 0o644
    finally:
        os.umask(old)
