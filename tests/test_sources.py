"""Each data source read from small fixtures: sidecar folders, COCO, Karpathy, save_to_disk, tar shards."""

from __future__ import annotations

import pytest
from PIL import Image

from captune.data import Shards, build_dataset, load_rgb, sniff, training_dataset
from captune.data.collate import CaptionPairs
from captune.errors import CaptuneError

from datafiles import COLOURS, coco_json, karpathy_json, png, tar_shards


def test_sidecar_folder_with_validation(tmp_path):
    for split, names in (("train", ["cat", "dog"]), ("validation", ["cow"])):
        (tmp_path / split).mkdir()
        for name in names:
            png(tmp_path / split / f"{name}.jpg")
            (tmp_path / split / f"{name}.txt").write_text(f"a {name}\n\nanother {name}\n")
    png(tmp_path / "train" / "nocaption.png")
    assert sniff(str(tmp_path)) == "sidecar"
    data = build_dataset(tmp_path, strict=False)
    assert {s.id: s.captions for s in data.train} == {"cat.jpg": ("a cat", "another cat"),
                                                       "dog.jpg": ("a dog", "another dog")}
    assert [s.id for s in data.validation] == ["cow.jpg"]
    assert [p.id for p in data.problems] == ["nocaption.png"] and "no caption file" in data.problems[0].reason
    with pytest.raises(CaptuneError, match="no caption file nocaption.txt"):
        build_dataset(tmp_path)  # strict by default


def test_coco_captions_json(tmp_path):
    path = coco_json(tmp_path)
    assert sniff(str(path)) == "coco"
    data = build_dataset(path, data_format="coco", image_root=str(tmp_path / "images"))
    assert sorted((s.id, s.captions) for s in data.train)[0] == ("000.png", ("first caption 0", "second caption 0"))
    assert load_rgb(data.train[0].image).getpixel((0, 0)) in [tuple(c) for c in COLOURS]
    # Without --image-root the JSON's folder is the root: images/ is not there, so nothing is usable.
    with pytest.raises(CaptuneError, match="image 000.png not found"):
        build_dataset(path)


def test_karpathy_splits_fold_restval_into_train(tmp_path):
    path = karpathy_json(tmp_path)
    assert sniff(str(path)) == "karpathy"
    data = build_dataset(path)
    assert sorted(s.id for s in data.train) == ["train2014/img0.png", "train2014/img4.png", "val2014/img1.png"]
    assert [s.id for s in data.validation] == ["val2014/img2.png"]
    assert [s.id for s in data.test] == ["val2014/img3.png"]
    assert data.validation[0].captions == ("caption 2 a", "caption 2 b")


def _hf_dataset(tmp_path):
    import datasets

    features = datasets.Features({"picture": datasets.Image(), "sentences": datasets.Sequence(datasets.Value("string"))})

    def split(colours, prefix):
        return datasets.Dataset.from_dict(
            {"picture": [Image.new("RGB", (16, 16), c) for c in colours],
             "sentences": [[f"{prefix} {i}", f"{prefix} {i} again"] for i in range(len(colours))]},
            features=features)

    path = tmp_path / "saved"
    datasets.DatasetDict({"train": split(COLOURS[:3], "tr"), "validation": split(COLOURS[3:5], "va")}).save_to_disk(
        str(path))
    return path


def test_hf_save_to_disk_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = _hf_dataset(tmp_path)
    assert sniff(str(path)) == "hf"
    data = build_dataset(path)
    assert [s.captions for s in data.train][1] == ("tr 1", "tr 1 again")
    assert len(data.validation) == 2
    # Images stay encoded in the table until a worker decodes them.
    assert load_rgb(data.validation[1].image).getpixel((3, 3)) == COLOURS[4]
    with pytest.raises(CaptuneError, match="no split 'nope'"):
        build_dataset(path, train_split="nope")
    with pytest.raises(CaptuneError, match="no column 'text'"):
        build_dataset(path, caption_column="text")


def test_hf_lazy_images_survive_pickling(tmp_path):
    import pickle

    data = build_dataset(_hf_dataset(tmp_path), image_column="picture", caption_column="sentences")
    item = pickle.loads(pickle.dumps(CaptionPairs(data.train)))[2]  # what a worker process receives
    assert item["caption"] == "tr 1" and item["image"].getpixel((0, 0)) == COLOURS[1]


def test_webdataset_shards_txt_and_json_captions(tmp_path):
    tar_shards(tmp_path / "train", n_shards=2, per_shard=3)
    tar_shards(tmp_path / "validation", n_shards=1, per_shard=2)
    assert sniff(str(tmp_path)) == "webdataset"
    data = build_dataset(tmp_path)
    assert isinstance(data.train, Shards) and data.train.images == 6
    assert data.train.pairs == 2 * (2 + 1 + 2)  # samples 0 and 2 of each shard carry two captions (json)
    assert {s.id: s.captions for s in data.validation} == {"s0_0": ("s0_0 one", "s0_0 two"), "s0_1": ("s0_1 caption",)}
    stream = training_dataset(data.train, caption_sampling="all")
    items = list(stream)
    assert len(items) == len(stream) == 10
    assert sorted(it["caption"] for it in items)[:3] == ["s0_0 one", "s0_0 two", "s0_1 caption"]
    assert len(list(training_dataset(data.train, caption_sampling="random"))) == 6


def test_caption_sampling_random_one_per_image(tmp_path):
    path = coco_json(tmp_path)
    data = build_dataset(path, image_root=str(tmp_path / "images"))
    pairs = CaptionPairs(data.train, "all")
    one_each = CaptionPairs(data.train, "random")
    assert len(pairs) == 6 and len(one_each) == 3
    assert one_each[0]["caption"] in data.train[0].captions


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "does not exist"),
    (lambda p: (p.mkdir(), p)[1], "cannot tell what"),
    (lambda p: (p.mkdir(), (p / "x.json").write_text("[1]"), p / "x.json")[2], "expected a JSON object"),
])
def test_sniff_errors(tmp_path, make, message):
    with pytest.raises(CaptuneError, match=message):
        build_dataset(make(tmp_path / "data"))


def test_eval_scores_a_karpathy_test_split(tmp_path, tiny, synthetic_dir, capsys):
    import json as _json

    from captune.cli import main

    path = karpathy_json(tmp_path / "coco")
    model, processor = tiny
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tmp_path / "model"), "--data", str(path), "--split", "test",
                 "--output", str(out), "--max-new-tokens", "3"]) == 0
    predictions = [_json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == ["val2014/img3.png"]
    assert predictions[0]["references"] == ["caption 3 a", "caption 3 b"]
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "model"), "--data", str(synthetic_dir),
                 "--split", "test", "--output", str(out)]) == 2
    assert "has no test split" in capsys.readouterr().err


def test_data_format_forces_the_reader(tmp_path):
    # A folder that is both: metadata.jsonl (sniffed first) and sidecar .txt captions.
    png(tmp_path / "a.png", COLOURS[0])
    (tmp_path / "a.txt").write_text("from the sidecar\n")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "from the metadata"}\n')
    assert sniff(str(tmp_path)) == "folder"
    assert build_dataset(tmp_path).train[0].captions == ("from the metadata",)
    assert build_dataset(tmp_path, data_format="sidecar").train[0].captions == ("from the sidecar",)
    with pytest.raises(CaptuneError):
        build_dataset(tmp_path, data_format="coco")
