"""Webdataset streaming: split across ranks and DataLoader workers, every sample exactly once per epoch."""

from __future__ import annotations

from collections import Counter

import pytest
from torch.utils.data import DataLoader

from captune.data import build_dataset, training_dataset
from captune.data.collate import CaptionCollator
from captune.model import blip_tokenizer, image_processor
from transformers import BlipProcessor

from datafiles import tar_shards


class IdCollator:
    """Keeps the captions (which carry the sample key) so the test can see which samples arrived."""

    def __call__(self, items):
        return [it["caption"] for it in items]


@pytest.mark.parametrize("n_shards, per_shard", [(3, 7), (1, 9)])  # more and fewer shards than the 4 consumers
def test_two_ranks_two_workers_see_each_sample_once(tmp_path, n_shards, per_shard):
    tar_shards(tmp_path, n_shards, per_shard)  # even samples: two captions in .json; odd: one in .txt
    shards = build_dataset(tmp_path).train
    expected = {f"s{s}_{i} {c}" for s in range(n_shards) for i in range(per_shard)
                for c in (("one", "two") if i % 2 == 0 else ("caption",))}
    for epoch in range(2):
        seen: Counter = Counter()
        per_rank = []
        for rank in range(2):
            stream = training_dataset(shards, caption_sampling="all", rank=rank, world_size=2)
            loader = DataLoader(stream, batch_size=2, num_workers=2, collate_fn=IdCollator())
            keys = [key for batch in loader for key in batch]
            per_rank.append(len(keys))
            seen.update(keys)
        assert set(seen) == expected and max(seen.values()) == 1, f"epoch {epoch}: {seen}"
        assert abs(per_rank[0] - per_rank[1]) <= 2  # balanced within one sample per worker


def test_bad_shard_members_become_skips(tmp_path):
    tar_shards(tmp_path, 1, 2, extra={"broken.jpg": b"not a jpeg", "broken.txt": b"a broken one",
                                      "nocap.jpg": b"\xff\xd8", "orphan.txt": b"no image"})
    shards = build_dataset(tmp_path).train
    processor = BlipProcessor(image_processor=image_processor(32), tokenizer=blip_tokenizer())
    loader = DataLoader(training_dataset(shards), batch_size=16, collate_fn=CaptionCollator(processor))
    batches = list(loader)
    skipped = {item["id"]: item["reason"] for batch in batches for item in batch.get("skipped", [])}
    assert set(skipped) == {"broken", "nocap", "orphan"}
    assert "not a readable image" in skipped["broken"] and "no caption member" in skipped["nocap"]
    assert "no image member" in skipped["orphan"]
    assert sum(batch["input_ids"].shape[0] for batch in batches) == 3  # s0_0 (two captions) and s0_1


def test_training_streams_shards_end_to_end(tmp_path):
    import json

    from captune.cli import main

    tar_shards(tmp_path / "shards", 2, 6)  # 12 images, 18 captions
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "shards"), "--model", "tiny", "--output", str(run),
                 "--epochs", "2", "--batch-size", "4", "--num-workers", "2", "--set", "train.log_every_steps=1"]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["split"] == "train"]
    epochs = [r["epoch"] for r in steps]
    assert epochs == sorted(epochs) and set(epochs) == {0, 1}  # both epochs streamed, in order
    assert len(steps) == json.loads((run / "summary.json").read_text())["steps"] >= 8
    assert (run / "last" / "model.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["train_images"] == 12 and summary["data"]["train_captions"] == 18
