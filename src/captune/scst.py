"""Self-critical sequence training (SCST): optimise the captions' CIDEr-D directly, after cross-entropy fine-tuning.

One step, per batch of training images (Rennie et al. 2017, with the baseline of Luo 2020):
    1. sample k captions per image from the model (`generate(do_sample=True, num_return_sequences=k)`, plain
       temperature-1 sampling over the whole vocabulary: the policy itself, no top-k/top-p);
    2. reward each with CIDEr-D against the image's references (captune.cider: document frequencies from the training
       captions, computed once; an end-of-caption word in the n-grams so truncated captions lose);
    3. baseline b: the mean reward of the image's *other* k-1 samples (default), or the greedy caption's reward;
    4. loss = -(r - b) * log p(sample), summed over the sampled caption tokens (its end token included, padding
       after it not) and averaged over all sampled tokens of the step (self-critical.pytorch's per-token mean).
The log-probabilities come from the family's `sequence_nll`: a teacher-forced forward through the (DDP-)wrapped model
of the batch the family's `tokenize` makes from the sampled *texts*, with each image's vision pass shared by its k
captions (`speed.share_images`), so nothing here knows the model family. Decoding to text and tokenizing again gives the
canonical tokenization of each sampled caption (the same ids for all but odd word pieces), and the reward is a
function of the text alone.

Sampling is seeded by (seed, epoch, batch, process) (captune.seeding), so a resumed run draws the same captions as
an uninterrupted one whatever else consumed random numbers in between.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.data import Dataset

from .cider import END, CiderD, build_cider_d, caption_words, cider_d
from .data.collate import IGNORE_INDEX, ItemOptions, blank_image, decode_image
from .data.records import CaptionSample
from .errors import CaptuneError
from .generate import GenerationOptions, caption_pixels
from .models import family_of
from .seeding import derive_seed, item_rng, seed_micro_batch
from .speed import share_images

log = logging.getLogger("captune")


@dataclass
class ScstSetup:
    """What every SCST step reads: built once per run by `build_scst`.

    Attributes:
        cider: document frequencies of the training references.
        references: per training image (dataset order), its captions as `caption_words` (END appended).
        samples: k, captions sampled per image.
        baseline: "mean" (of the image's other samples) or "greedy".
        sampling, greedy: decoding options of the samples and of the greedy baseline.
        tokenize: the family's training-batch text builder: captions -> input_ids, attention_mask, labels.
    """

    cider: CiderD
    references: list[list[list[str]]]
    samples: int
    baseline: str
    sampling: GenerationOptions
    greedy: GenerationOptions
    tokenize: Callable[[list[str]], dict]
    meter: "RewardMeter" = field(default_factory=lambda: RewardMeter())


def build_scst(train: list[CaptionSample], *, samples: int, baseline: str, prompt: str, max_new_tokens: int,
               tokenize: Callable[[list[str]], dict]) -> ScstSetup:
    """Tokenize the training references and count their document frequencies (once per run).

    Raises:
        CaptuneError: the training data is streamed (tar shards): its captions are not known up front.
    """
    if not isinstance(train, list):
        raise CaptuneError("train.objective scst needs the training captions up front for CIDEr-D's document "
                           "frequencies: use a folder, COCO/Karpathy or datasets copy of the data, not tar shards")
    started = time.perf_counter()
    references = [[caption_words(c) for c in sample.captions] for sample in train]
    cider = build_cider_d(references)
    log.info("SCST: CIDEr-D document frequencies from %d training images (%d captions) in %.1f s", len(references),
             sum(map(len, references)), time.perf_counter() - started)
    return ScstSetup(
        cider=cider, references=references, samples=samples, baseline=baseline, tokenize=tokenize,
        sampling=GenerationOptions(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, num_return_sequences=samples,
                                   max_new_tokens=max_new_tokens, prompt=prompt),
        greedy=GenerationOptions(max_new_tokens=max_new_tokens, prompt=prompt),
    )


class ScstImages(Dataset):
    """SCST's training items: each image once per epoch, with its position (which picks its references)."""

    def __init__(self, samples: list[CaptionSample], options: ItemOptions, seed: int = 0):
        self.samples = samples
        self.options = options
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def groups(self) -> None:
        return None  # one item per image: nothing for the sampler to keep together

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        # EpochSampler hands (epoch, index): a crop is a function of those alone, whichever worker draws it.
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image = decode_image(self.samples[index], self.options, item_rng(self.seed, epoch, "scst-crop", index))
        return image if isinstance(image, dict) else {"image": image, "index": index}


class ScstCollator:
    """Batch `ScstImages` items into pixel_values and dataset indices, with the keys the training loop expects
    (`pairs`: usable images; `skipped`: bad ones). A batch with no usable image is one grey placeholder (index -1)
    whose samples get no advantage: every process still runs the step's collectives."""

    def __init__(self, pixel_values: Callable[[list], torch.Tensor], processor):
        self.pixel_values = pixel_values
        self.processor = processor

    def __call__(self, items: list[dict]) -> dict:
        skipped = [it["skip"] for it in items if "skip" in it]
        items = [it for it in items if "skip" not in it and "pad" not in it]
        images = [it["image"] for it in items] or [blank_image(self.processor)]
        batch = {"pixel_values": self.pixel_values(images),
                 "index": torch.tensor([it["index"] for it in items] or [-1]), "pairs": len(items)}
        if skipped:
            batch["skipped"] = skipped
        return batch


def rewards_and_baseline(setup: ScstSetup, sampled: list[str], greedy: list[str] | None,
                         index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, baselines), each (images, k): CIDEr-D of every sample and what it is compared with."""
    k = setup.samples
    references = [setup.references[i] if i >= 0 else [[END]] for i in index]
    groups = [[caption_words(c) for c in sampled[j * k : (j + 1) * k]] for j in range(len(index))]
    rewards = torch.tensor(cider_d(setup.cider, groups, references), dtype=torch.float32)
    if setup.baseline == "mean":
        baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    else:
        greedy_rewards = torch.tensor(cider_d(setup.cider, [[caption_words(g)] for g in greedy], references))
        baseline = greedy_rewards.float().expand(-1, k)
    return rewards, baseline


def sample_window(setup: ScstSetup, window: list[dict], *, unwrapped, processor, seed: int, epoch: int,
                  first_batch: int, process: int) -> list[dict]:
    """Sample and reward every micro-batch of an accumulation window (no gradients): per micro-batch, the tokenized
    samples and each sample's advantage. Sampling first lets the step weigh every sampled token of the window
    equally, as cross-entropy weighs caption tokens (train.backward_window)."""
    k = setup.samples
    was_training = unwrapped.training
    unwrapped.eval()
    prepared = []
    for position, batch in enumerate(window):
        index = batch["index"].tolist()
        # A function of the position alone, so a resumed run samples exactly what the uninterrupted run sampled.
        torch.manual_seed(derive_seed(seed, epoch, "scst-samples", first_batch + position, process))
        sampled = caption_pixels(unwrapped, processor, batch["pixel_values"], setup.sampling)
        greedy = (caption_pixels(unwrapped, processor, batch["pixel_values"], setup.greedy)
                  if setup.baseline == "greedy" else None)
        rewards, baseline = rewards_and_baseline(setup, sampled, greedy, index)
        advantage = (rewards - baseline).reshape(-1)
        if index == [-1]:
            advantage.zero_()  # the placeholder image trains nothing
        else:
            setup.meter.add(rewards, baseline if greedy is not None else None)
        text = setup.tokenize(sampled)
        if index == [-1]:
            text["labels"].fill_(IGNORE_INDEX)  # and counts no token
        prepared.append({"text": text, "advantage": advantage, "images": len(index)})
    unwrapped.train(was_training)
    return prepared


def scst_backward_window(setup: ScstSetup, accelerator, model, vision, window: list[dict], *, processor, seed: int,
                         epoch: int, first_batch: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """SCST's counterpart of `train.backward_window`: sample and reward the window, then forward and backward each
    micro-batch's samples, gradients synchronised after the last.

    The step's loss is -(r - b) * log p summed over every sampled token of the window on every process and divided
    by their count (self-critical.pytorch's per-token mean, over the whole window): DDP's average over processes and
    `accelerator.backward`'s division by grad_accum are undone by the scale, as for cross-entropy.

    Args:
        model: the prepared (maybe DDP-wrapped) model: the forward goes through it so gradients synchronise.
        vision: the unwrapped vision tower; each image's output rows are repeated for its k samples.
        first_batch: the epoch position of the window's first micro-batch (seeds its samples and dropout).

    Returns:
        (this process's summed loss, detached; sampled tokens of the window on all processes; usable images).
    """
    unwrapped = accelerator.unwrap_model(model)
    family = family_of(unwrapped)
    prepared = sample_window(setup, window, unwrapped=unwrapped, processor=processor, seed=seed, epoch=epoch,
                             first_batch=first_batch, process=accelerator.process_index)
    tokens = torch.stack([family.target_tokens(p["text"]) for p in prepared]).sum().to(accelerator.device)
    if accelerator.num_processes > 1:
        tokens = accelerator.reduce(tokens, reduction="sum")
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes / tokens.clamp(min=1)
    loss_sum, pairs = torch.zeros((), device=accelerator.device), 0
    for position, (batch, sample) in enumerate(zip(window, prepared)):
        pairs += batch.pop("pairs")
        accelerator.sync_gradients = position == len(window) - 1
        seed_micro_batch(seed, epoch, first_batch + position, accelerator.process_index)
        pixel_values = batch["pixel_values"]
        rows = {name: value.to(pixel_values.device) for name, value in sample["text"].items()}
        rows["pixel_values"] = pixel_values
        image_index = torch.arange(sample["images"], device=pixel_values.device).repeat_interleave(setup.samples)
        with (contextlib.nullcontext() if accelerator.sync_gradients else accelerator.no_sync(model),
              share_images(vision, image_index)):
            # The family's own forward and label alignment (BLIP's shifted decoder, GIT's image rows, Florence-2's
            # unshifted decoder labels): -log p of each sampled caption.
            nll = family.sequence_nll(model, rows)
            loss = (sample["advantage"].to(nll.device, nll.dtype) * nll).sum()
            accelerator.backward(loss * scale)
        loss_sum = loss_sum + loss.detach()
    return loss_sum, tokens, pairs


class RewardMeter:
    """Mean sampled (and greedy) reward over one optimizer step's micro-batches, agreed across processes."""

    def __init__(self):
        self.sums = [0.0, 0.0, 0.0]  # sampled rewards, greedy rewards, samples
        self.greedy = False

    def add(self, rewards: torch.Tensor, greedy: torch.Tensor | None) -> None:
        self.sums[0] += float(rewards.sum())
        self.sums[1] += float(greedy.sum()) if greedy is not None else 0.0
        self.sums[2] += rewards.numel()
        self.greedy = greedy is not None

    def finish_step(self, accelerator) -> dict:
        """{reward[, greedy_reward]} of the step (None when no process had a usable image), then reset. A
        collective: every process calls it once a step."""
        sums, self.sums = self.sums, [0.0, 0.0, 0.0]
        totals = torch.tensor(sums, dtype=torch.float64, device=accelerator.device)
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals, reduction="sum")
        reward, greedy_reward, count = totals.tolist()
        out = {"reward": reward / count if count else None}
        if self.greedy:
            out["greedy_reward"] = greedy_reward / count if count else None
        return out
