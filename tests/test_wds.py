"""Webdataset streaming: split across ranks and DataLoader workers, every sample exactly once per epoch."""

from __future__ import annotations

from collections import Counter

import pytest
from torch.utils.data import DataLoader

from captune.data import build_dataset, training_dataset
from captune.data.collate import CaptionCollator
from captune.models.blip import blip_tokenizer, image_processor
from transformers import BlipProcessor

from datafiles import tar_shards


class IdCollator:
    """Keeps the captions (which carry the sample key) so the test can see which samples arrived."""

    def __call__(self, items):
        return [it.get("caption", "<pad>") for it in items]


@pytest.mark.parametrize("n_shards, per_shard", [(3, 7), (1, 9)])  # more and fewer shards than the 4 consumers
def test_two_ranks_two_workers_see_each_sample_once(tmp_path, n_shards, per_shard):
    tar_shards(tmp_path, n_shards, per_shard)  # even samples: two captions in .json; odd: one in .txt
    shards = build_dataset(tmp_path).train
    expected = {f"s{s}_{i} {c}" for s in range(n_shards) for i in range(per_shard)
                for c in (("one", "two") if i % 2 == 0 else ("caption",))}
    for epoch in range(2):
        seen: Counter = Counter()
        batches = []
        for rank in range(2):
            stream = training_dataset(shards, caption_sampling="all", rank=rank, world_size=2, num_workers=2)
            stream.set_epoch(epoch)
            loader = DataLoader(stream, batch_size=2, num_workers=2, collate_fn=IdCollator())
            keys = [batch for batch in loader]
            batches.append(len(keys))
            assert len(keys) == stream.batches(2)
            seen.update(key for batch in keys for key in batch)
        pads = seen.pop("<pad>", 0)
        assert set(seen) == expected and max(seen.values()) == 1, f"epoch {epoch}: {seen}"
        # Uneven shares are topped up with padding: both ranks run the same number of steps (no hang at the end).
        assert batches[0] == batches[1] and pads == 4 * stream.per_consumer - len(expected)


def test_stream_order_is_a_function_of_seed_and_epoch(tmp_path):
    tar_shards(tmp_path, 2, 9)

    def order(epoch: int, seed: int = 0) -> list[str]:
        stream = training_dataset(build_dataset(tmp_path).train, num_workers=2, seed=seed)
        stream.shuffle_buffer = 4
        stream.set_epoch(epoch)
        loader = DataLoader(stream, batch_size=3, num_workers=2, collate_fn=IdCollator())
        return [key for batch in loader for key in batch]

    first = order(0)
    assert order(0) == first  # a resumed run replays the interrupted epoch exactly
    assert order(1) != first and sorted(order(1)) == sorted(first)
    assert order(0, seed=1) != first


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


def test_accumulation_steps_on_each_epochs_last_partial_window(tmp_path):
    """5 batches an epoch, 2 per optimizer step: 3 steps an epoch, the third on one batch; nothing spills over."""
    import json

    from captune.cli import main

    tar_shards(tmp_path / "shards", 1, 6)  # 9 captions: batches of 2, 2, 2, 2, 1
    run = tmp_path / "run"
    assert main(["-q", "train", "--data", str(tmp_path / "shards"), "--model", "tiny", "--output", str(run),
                 "--epochs", "2", "--batch-size", "2", "--num-workers", "0", "--grad-accum", "2",
                 "--report-to", "none", "--set", "train.log_every_steps=1"]) == 0
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in steps if r["split"] == "train"]
    assert epochs == [0, 0, 0, 1, 1, 1]


def test_a_stream_read_by_more_workers_than_it_was_split_for_refuses(tmp_path):
    tar_shards(tmp_path, 1, 4)
    stream = training_dataset(build_dataset(tmp_path).train, num_workers=0)
    with pytest.raises(ValueError, match="pass num_workers"):
        list(DataLoader(stream, batch_size=2, num_workers=2, collate_fn=IdCollator()))
