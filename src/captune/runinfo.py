"""Facts about a training run the report shows beside its numbers: versions, peak memory, the data's git commit.

Kept apart from the loop so train.py only calls them; every function here is cheap and never raises.
"""

from __future__ import annotations

import math
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "transformers", "accelerate", "peft", "captune")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a result depends on (python included); "not installed" when absent."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            # A clone run with PYTHONPATH=src has no installed distribution: the package's own version then.
            module = sys.modules.get(name)
            versions[name] = getattr(module, "__version__", "not installed")
    return versions


def peak_memory(device) -> dict:
    """Peak memory of this process so far: CUDA's max allocated bytes on a GPU, else the peak resident set size."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return {"kind": "GPU max allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    try:
        import resource

        # ru_maxrss is in KiB on Linux (bytes on macOS).
        scale = 1 if sys.platform == "darwin" else 1024
        return {"kind": "CPU peak resident set (main process)",
                "bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale}
    except (ImportError, OSError):  # Windows has no `resource`
        return {}


def data_commit(path: str) -> dict:
    """The git commit (and whether the tree had local changes) of the repository holding the dataset, if any."""
    folder = Path(path).expanduser()
    if not folder.exists():
        return {}  # a Hub dataset id, not a local path
    folder = folder if folder.is_dir() else folder.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    status = git("status", "--porcelain", "--", ".")
    return {"commit": commit, "dirty": bool(status)}


def loss_floor(label_smoothing: float, vocab_size: int) -> float:
    """The lowest value label-smoothed cross entropy can take: the entropy of the smoothed target distribution.

    With smoothing e over V classes the target puts 1 - e + e/V on the right token and e/V on each other one, so
    even a perfect model's loss stays at that distribution's entropy (about 1.36 for e = 0.1 and BERT's 30,524
    tokens); 0 without smoothing.
    """
    if label_smoothing <= 0 or vocab_size < 2:
        return 0.0
    other = label_smoothing / vocab_size
    right = 1 - label_smoothing + other
    return -(right * math.log(right) + (vocab_size - 1) * other * math.log(other))
