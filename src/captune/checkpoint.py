"""Resumable checkpoints (Accelerate's save_state, written atomically), model directories, and export.

A run directory holds:
    checkpoints/step-00000012/   Accelerate state (model, optimizer, scheduler, RNG) + captune_state.json
    best/, last/                 save_pretrained model (or LoRA adapter) + processor + captune.json
A checkpoint is complete exactly when its directory is named `step-*`: it is written as `.tmp-step-*` and renamed
at the end, so a kill mid-save leaves only a temporary directory that resume ignores and the next save removes.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import threading
from pathlib import Path

import torch

from .errors import CaptuneError
from .files import truncate_lines, write_json  # noqa: F401  (truncate_lines: resume uses it from here)
from .models import SETTINGS_FILE

log = logging.getLogger("captune")

CHECKPOINTS = "checkpoints"
STATE_FILE = "captune_state.json"
_NAME = re.compile(r"step-(\d+)")


def save_model(model, processor, directory: Path, settings: dict | None = None, card: str | None = None) -> None:
    """save_pretrained (safetensors) of model and processor, via a temporary directory then a rename.

    A peft model writes its adapter only (adapter_config.json + adapter_model.safetensors); `settings` (prompt,
    generation options, base model) go to captune.json beside them, so `captune caption` and `eval` decode as
    training validated and can rebuild the base under an adapter.
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    if settings is not None:
        write_json(tmp / SETTINGS_FILE, settings)
    if card is not None:  # a Hugging Face model card (modelcard.py)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(accelerator, run_dir: Path, step: int, state: dict, keep_last: int) -> Path:
    """Write a resumable checkpoint on every process (each saves its RNG state), then publish it atomically.

    Args:
        accelerator: the run's Accelerator; the scheduler must be registered for checkpointing.
        run_dir: the run directory.
        step: optimizer steps done; names the checkpoint.
        state: captune's own loop state (epoch, position, best score, metrics lines), stored as JSON.
        keep_last: how many complete checkpoints to keep.

    Returns:
        The checkpoint directory.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's RNG file is in before the rename publishes the checkpoint
    if accelerator.is_main_process:
        write_json(tmp / STATE_FILE, {"step": step, **state})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Path) -> dict:
    """Restore model, optimizer, registered scheduler and RNG states; return captune's loop state."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        accelerator.load_state(str(checkpoint))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CaptuneError(
            f"checkpoint {checkpoint} cannot be restored ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): "
            "was the configuration (model, train.mode) changed since it was written? Delete it to resume from an older one"
        ) from exc
    return state


def clear_run_state(run_dir: Path) -> None:
    """A fresh run in an existing directory: drop old checkpoints and metrics so nothing mixes with the new run."""
    old = Path(run_dir) / CHECKPOINTS
    if old.is_dir() and any(old.iterdir()):
        log.warning("starting afresh in %s: removing its old checkpoints (pass --resume to continue a run)", run_dir)
        shutil.rmtree(old)
    (Path(run_dir) / "metrics.jsonl").unlink(missing_ok=True)


def remove_partial_checkpoints(run_dir: Path) -> None:
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for tmp in root.glob(".tmp-step-*"):
            shutil.rmtree(tmp, ignore_errors=True)


def export_merged(source: str | Path, output: str | Path) -> Path:
    """Write a plain transformers model directory (LoRA merged in) that `from_pretrained` loads without captune.

    Args:
        source: a run directory (its best/ is exported) or a model/adapter directory.
        output: the directory to write.

    Raises:
        CaptuneError: `source` holds no model.
    """
    from .model import load_captune_settings, load_model_and_processor

    source = Path(source)
    if (source / "best").is_dir():
        source = source / "best"
    if not source.is_dir():
        raise CaptuneError(f"export: {source} is not a run or model directory")
    model, processor = load_model_and_processor(str(source))
    settings = load_captune_settings(str(source))
    settings.pop("adapter", None)
    save_model(model, processor, Path(output), settings or None)
    return Path(output)


class StopRequests:
    """While active, SIGINT/SIGTERM set `requested` (the signal name) instead of killing the run.

    The loop checks it after each optimizer step, saves a checkpoint and returns. A second SIGINT interrupts at once.
    Handlers are only installed from the main thread (Python allows no other), and restored on exit.
    """

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint after this step, then stopping (Ctrl-C again to abort)",
                    self.requested)

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
