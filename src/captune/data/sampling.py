"""The training order: a fresh permutation per epoch that depends on (seed, epoch) alone, so resume replays it."""

from __future__ import annotations

import torch


class EpochSampler(torch.utils.data.Sampler):
    """A fresh random order each epoch, drawn from `seed + epoch` alone; yields `(epoch, index)` keys.

    The order does not depend on how many epochs this process has already iterated, so a run resumed mid-epoch
    replays the interrupted epoch's permutation (then skips the batches already done). Deliberately not named
    `set_epoch`: Accelerate calls that with its own per-loader iteration count, which restarts at 0 on resume.

    The epoch travels with each index because it is the only way it reaches persistent DataLoader workers (their
    copy of the dataset never sees a later `set_epoch`): the dataset derives an item's random draws from it.
    """

    def __init__(self, size: int, seed: int, groups: list[int] | None = None):
        self.size, self.seed, self.epoch = size, seed, 0
        self.groups = groups
        """Sizes of runs of consecutive indices that stay together (an image's captions); None = no runs."""
        if groups is not None and sum(groups) != size:
            raise ValueError(f"groups cover {sum(groups)} indices, not {size}")

    def set_order(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        epoch = self.epoch
        if self.groups is None:
            return ((epoch, index) for index in torch.randperm(self.size, generator=generator).tolist())
        starts = [0]
        for size in self.groups[:-1]:
            starts.append(starts[-1] + size)
        order = torch.randperm(len(self.groups), generator=generator).tolist()
        return ((epoch, starts[g] + k) for g in order for k in range(self.groups[g]))

    def __len__(self) -> int:
        return self.size
