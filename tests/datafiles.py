"""Small dataset fixtures written by the tests: good images, every kind of bad input, each source format."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

from PIL import Image

COLOURS = [(200, 30, 30), (30, 160, 40), (30, 60, 220), (230, 200, 20), (120, 40, 160), (20, 180, 180)]


def jpeg_bytes(colour=(200, 30, 30), size=(32, 24), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(buffer, "JPEG")
    return buffer.getvalue()


def png(path: Path, colour=(200, 30, 30), size=(32, 24)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")


# name -> text that must appear in its problem message (check) / skip reason (training)
BAD_CASES = {
    "corrupt.jpg": "not a readable image",
    "truncated.jpg": "truncated",
    "zero.jpg": "0 bytes",
    "text.png": "not a readable image",
    "bomb.png": "decompression bomb",
    "missing.png": "not found",
    "empty_caption.png": "empty caption",
    "blank_caption.png": "empty caption",
    "../outside.png": "outside the dataset folder",
    "/etc/hostname": "outside the dataset folder",
    "link_out.png": "outside the dataset folder",
}
BAD_LINES = {"malformed JSON": "not valid JSON", "non-UTF-8": "not UTF-8"}


def bad_folder(root: Path, n_good: int = 4) -> Path:
    """An imagefolder with `n_good` good images and one row per bad case (BAD_CASES, BAD_LINES).

    The bomb is 100x100 = 10,000 pixels: run with a pixel limit of 5,000.
    """
    root.mkdir(parents=True)
    rows = []
    for i in range(n_good):
        png(root / f"good{i}.png", COLOURS[i % len(COLOURS)])
        rows.append({"file_name": f"good{i}.png", "text": f"a plain colour number {i}"})
    noise = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, "JPEG")
    big = buffer.getvalue()
    # Fixed bytes: random ones occasionally form a decodable JPEG and made this case flaky.
    (root / "corrupt.jpg").write_bytes(big[:20] + bytes(range(256)) * 2)
    (root / "truncated.jpg").write_bytes(big[: len(big) // 2])
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.png").write_text("this is not a picture")
    png(root / "bomb.png", size=(100, 100))
    png(root / "empty_caption.png")
    png(root / "blank_caption.png")
    png(root.parent / "outside.png")
    (root / "link_out.png").symlink_to(root.parent / "outside.png")
    for name in BAD_CASES:
        caption = {"empty_caption.png": "", "blank_caption.png": "  \t "}.get(name, f"a picture called {name}")
        rows.append({"file_name": name, "text": caption})
    write_jsonl(root / "metadata.jsonl", rows)
    with open(root / "metadata.jsonl", "ab") as handle:
        handle.write(b'{"file_name": "good0.png", "text": \n')  # malformed JSON
        handle.write(b'{"file_name": "good1.png", "text": "caf\xe9 latin-1"}\n')  # non-UTF-8
    return root


def coco_json(root: Path, n: int = 3) -> Path:
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(n):
        png(root / "images" / f"{i:03d}.png", COLOURS[i])
        images.append({"id": 100 + i, "file_name": f"{i:03d}.png"})
        annotations += [{"id": 2 * i, "image_id": 100 + i, "caption": f"first caption {i}"},
                        {"id": 2 * i + 1, "image_id": 100 + i, "caption": f"second caption {i} "}]
    path = root / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def karpathy_json(root: Path) -> Path:
    splits = ["train", "restval", "val", "test", "train"]
    images = []
    for i, split in enumerate(splits):
        folder = root / ("val2014" if split != "train" else "train2014")
        folder.mkdir(parents=True, exist_ok=True)
        png(folder / f"img{i}.jpg".replace(".jpg", ".png"), COLOURS[i])
        images.append({"split": split, "filepath": folder.name, "filename": f"img{i}.png",
                       "sentences": [{"raw": f"caption {i} a"}, {"raw": f"caption {i} b"}]})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def tar_shards(root: Path, n_shards: int, per_shard: int, *, json_every: int = 2, extra: dict | None = None) -> list:
    """Shards of `per_shard` samples each, ids `s{shard}_{i}`; every `json_every`-th caption in .json, others .txt."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        path = root / f"shard-{s:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"s{s}_{i}"
                members = {f"{key}.jpg": jpeg_bytes(COLOURS[i % len(COLOURS)])}
                if i % json_every == 0:
                    members[f"{key}.json"] = json.dumps({"caption": [f"{key} one", f"{key} two"]}).encode()
                else:
                    members[f"{key}.txt"] = f"{key} caption\n".encode()
                for name, data in members.items():
                    _add(tar, name, data)
            for name, data in (extra or {}).items() if s == 0 else ():
                _add(tar, name, data)
        paths.append(path)
    return paths


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
