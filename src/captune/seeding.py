"""Every random draw of a training run is a function of (seed, epoch, position), never of how the run got there.

Why not just restore the RNG states a checkpoint saved (Accelerate's `load_state` does that)? Because a resumed
run does not replay the same draws in the same order: creating the `skip_first_batches` loader draws its base seed
from the global torch RNG at a different moment than the uninterrupted run did (once at the epoch start), DataLoader
workers are then seeded differently and hand out batches to different workers, and a persistent worker's Python
`random` state is not in any checkpoint at all. A restored stream that is one draw off changes every dropout mask and
crop after it. Deriving each draw from where it happens (which epoch, which item, which micro-batch, which process)
makes resuming exact by construction, independent of worker count, prefetching, or what was skipped.

The derivation hashes the parts with SHA-256 (not Python's `hash`, which is salted per process), so every process
and worker computes the same value for the same position on any machine.
"""

from __future__ import annotations

import hashlib
import random

import torch

__all__ = ["derive_seed", "item_rng", "seed_loader", "seed_micro_batch"]


def derive_seed(*parts) -> int:
    """A 63-bit seed from `parts` (ints or strings): equal parts give equal seeds everywhere, any change a new one."""
    text = " ".join(str(part) for part in ("captune", *parts))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") >> 1


def item_rng(seed: int, epoch: int, *position) -> random.Random:
    """A `random.Random` for one training item's draws (its caption, its crop), whichever worker makes them."""
    return random.Random(derive_seed(seed, epoch, *position))


def seed_micro_batch(seed: int, epoch: int, batch: int, process: int) -> None:
    """Reseed torch's global RNG (CPU and every CUDA device) for the micro-batch at `batch` of `epoch` on `process`.

    Dropout (LoRA's 0.05, the model's own) draws from the global generator. Reseeding it before each forward makes
    the masks a function of the position alone, so a run resumed mid-epoch draws exactly the masks the uninterrupted
    run drew there, whatever else touched the global RNG in between (a loader's base seed, an evaluation). The
    process index is mixed in so data-parallel replicas do not share masks. `torch.manual_seed` is a few
    microseconds on CPU and lazy on CUDA: nothing next to a forward pass.
    """
    torch.manual_seed(derive_seed(seed, epoch, "micro-batch", batch, process))


def seed_loader(generator: torch.Generator | None, seed: int, epoch: int) -> None:
    """Reseed the generator a DataLoader draws its workers' base seed from, for `epoch`.

    Given its own generator, a DataLoader never draws from the global RNG when an iterator is created (the
    `skip_first_batches` loader of a resumed run included). captune's items draw nothing from the worker seed (see
    `item_rng`), so this is hygiene for code that does (a user's transform), not what exactness rests on.
    """
    if generator is not None:
        generator.manual_seed(derive_seed(seed, epoch, "loader"))
