"""Reading a Hugging Face imagefolder: captions per image, splits, and clear errors."""

import json

import pytest
from PIL import Image

from captune.data import build_dataset
from captune.errors import CaptuneError


def _folder(root, rows, metadata="metadata.jsonl", images=None):
    root.mkdir(parents=True, exist_ok=True)
    for name in images if images is not None else {r["file_name"] for r in rows}:
        Image.new("RGB", (8, 8)).save(root / name)
    if metadata.endswith(".jsonl"):
        (root / metadata).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_one_caption_per_image(tmp_path):
    _folder(tmp_path, [{"file_name": "a.png", "text": "a cat"}, {"file_name": "b.png", "text": "a dog"}])
    data = build_dataset(tmp_path)
    assert sorted((s.id, s.captions) for s in data.train) == [("a.png", ("a cat",)), ("b.png", ("a dog",))]
    assert data.validation == []


def test_several_captions_from_lists_and_repeated_rows(tmp_path):
    rows = [
        {"file_name": "a.png", "caption": ["a cat", "a kitten"]},
        {"file_name": "a.png", "caption": "a small cat"},
        {"file_name": "b.png", "caption": "a dog"},
    ]
    data = build_dataset(_folder(tmp_path, rows))
    by_id = {s.id: s.captions for s in data.train}
    assert by_id == {"a.png": ("a cat", "a kitten", "a small cat"), "b.png": ("a dog",)}


def test_csv_with_bom_and_quotes(tmp_path):
    _folder(tmp_path, [], metadata="metadata.csv", images=["a.png", "b.png"])
    (tmp_path / "metadata.csv").write_text(
        '\ufefffile_name,text\na.png,"a cat, sitting"\nb.png,"a ""quoted"" dog"\n', encoding="utf-8"
    )
    by_id = {s.id: s.captions for s in build_dataset(tmp_path).train}
    assert by_id == {"a.png": ("a cat, sitting",), "b.png": ('a "quoted" dog',)}


def test_validation_subfolder(tmp_path):
    _folder(tmp_path / "train", [{"file_name": "a.png", "text": "a cat"}])
    _folder(tmp_path / "val", [{"file_name": "v.png", "text": "a cow"}])
    data = build_dataset(tmp_path)
    assert [s.id for s in data.train] == ["a.png"]
    assert [s.id for s in data.validation] == ["v.png"]
    assert data.validation[0].image == tmp_path / "val" / "v.png"


def test_val_split_is_by_image_and_reproducible(tmp_path):
    rows = [{"file_name": f"{i}.png", "text": [f"c{i}", f"d{i}"]} for i in range(20)]
    _folder(tmp_path, rows)
    first = build_dataset(tmp_path, val_split=0.25, seed=1)
    again = build_dataset(tmp_path, val_split=0.25, seed=1)
    other = build_dataset(tmp_path, val_split=0.25, seed=2)
    assert len(first.validation) == 5 and len(first.train) == 15
    assert [s.id for s in first.validation] == [s.id for s in again.validation]
    assert {s.id for s in first.validation} != {s.id for s in other.validation}
    assert not {s.id for s in first.train} & {s.id for s in first.validation}
    assert all(len(s.captions) == 2 for s in first.validation)  # an image keeps all its captions


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "no metadata.jsonl or metadata.csv"),
        (lambda p: (p.mkdir(), (p / "metadata.jsonl").write_text("\n")), "has no rows"),
        (lambda p: _folder(p, [{"file_name": "a.png", "label": "x"}]), "no caption column"),
        (lambda p: _folder(p, [{"file_name": "a.png", "text": "  "}]), "empty caption"),
        (lambda p: _folder(p, [{"file_name": "gone.png", "text": "x"}], images=[]), "gone.png not found"),
        (lambda p: _folder(p, [{"file_name": "../a.png", "text": "x"}], images=[]), "outside the dataset folder"),
    ],
)
def test_clear_errors(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(CaptuneError) as info:
        build_dataset(root)
    assert message in str(info.value)


def test_malformed_jsonl_names_the_line(tmp_path):
    _folder(tmp_path, [{"file_name": "a.png", "text": "x"}])
    with open(tmp_path / "metadata.jsonl", "a") as handle:
        handle.write('{"file_name": "a.png", "text": \n')
    with pytest.raises(CaptuneError, match=r"metadata.jsonl:2: not valid JSON"):
        build_dataset(tmp_path)
