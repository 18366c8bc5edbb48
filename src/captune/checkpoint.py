"""Resumable checkpoints (Accelerate's save_state, written atomically), model directories, and export.

A run directory holds:
    checkpoints/step-00000012/   Accelerate state (model, optimizer, scheduler, RNG) + captune_state.json
    best/, last/                 save_pretrained model (or LoRA adapter) + processor + captune.json
A checkpoint is complete exactly when its directory is named `step-*`: it is written as `.tmp-step-*` and renamed
at the end, so a kill mid-save leaves only a temporary directory that resume ignores and the next save removes.
Its captune_state.json records the size and SHA-256 of every file beside it, so resume can tell a damaged
checkpoint (bit rot, a truncated copy, a zero-byte RNG file) and fall back to the previous intact one.

Nothing in a checkpoint is unpickled in a way that can run code: captune's own state (loop position, the LR
scheduler) is JSON, the model is safetensors, and the optimizer and RNG files go through torch's weights-only
unpickler (Accelerate's default). Accelerate's custom-object files (`custom_checkpoint_*.pkl`), which it loads with
`weights_only=False`, are never written and refused when present.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
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
    """save_pretrained (safetensors) of model and processor into a new directory, then swapped in for `directory`.

    A peft model writes its adapter only (adapter_config.json + adapter_model.safetensors); `settings` (prompt,
    generation options, base model) go to captune.json beside them, so `captune caption` and `eval` decode as
    training validated and can rebuild the base under an adapter.

    Raises:
        CaptuneError: the disk filled up while writing (the previous `directory` is left as it was).
    """
    directory = Path(directory)
    restore_interrupted_swap(directory)
    # A fresh, uniquely named sibling: a folder that merely happens to be called `best.tmp` is never deleted.
    tmp = _new_sibling_dir(directory, ".tmp")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        if settings is not None:
            write_json(tmp / SETTINGS_FILE, settings)
        if card is not None:  # a Hugging Face model card (modelcard.py)
            (tmp / "README.md").write_text(card, encoding="utf-8")
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_disk_full(exc, directory, f"{directory} is unchanged")
        raise
    try:
        swap_in(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the swap succeeded


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _new_sibling_dir(directory: Path, suffix: str) -> Path:
    directory.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=suffix, dir=directory.parent))
    os.chmod(path, 0o777 & ~_umask())  # mkdtemp makes 0700; what captune publishes follows the umask
    return path


def _aside_dirs(directory: Path) -> list[Path]:
    return sorted(directory.parent.glob(f".{glob.escape(directory.name)}.*.old"))


def swap_in(new: Path, directory: Path) -> None:
    """Replace `directory` by `new`: the old one is renamed aside, the new one renamed in, then the old one deleted.

    At every instant one of the two is a complete directory: an exception between the renames puts the old one
    back, and a kill there leaves it aside, where `restore_interrupted_swap` (run before any later write or read of
    `directory`) finds it. (Linux's renameat2(RENAME_EXCHANGE) would swap in one step, but not portably.)
    """
    aside = None
    if directory.exists():
        aside = _new_sibling_dir(directory, ".old")
        os.rmdir(aside)  # only the unique name is wanted; rename needs the target absent
        directory.rename(aside)
    try:
        new.rename(directory)
    except BaseException:
        if aside is not None and not directory.exists():
            aside.rename(directory)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def restore_interrupted_swap(directory: str | Path) -> None:
    """Put back a model directory that a killed `swap_in` left renamed aside (`.best.XXXX.old`)."""
    directory = Path(directory)
    asides = _aside_dirs(directory) if directory.parent.is_dir() else []
    if asides and not directory.exists():
        log.warning("%s was being replaced when the process stopped: restoring the previous one", directory)
        asides[-1].rename(directory)
    for leftover in _aside_dirs(directory):
        if directory.exists():
            shutil.rmtree(leftover, ignore_errors=True)


def is_disk_full(exc: BaseException) -> bool:
    """True for the ways a full disk (or quota) surfaces: OSError ENOSPC/EDQUOT, PyTorch's zip writer failing
    (`PytorchStreamWriter failed writing file ...: file write failed`), safetensors' `No space left on device`."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return any(marker in text for marker in ("No space left", "StorageFull", "Disk quota exceeded",
                                               "PytorchStreamWriter failed writing", "file write failed"))


def raise_if_disk_full(exc: BaseException, where: Path, intact: str) -> None:
    """Turn a write failure from a full disk into a CaptuneError saying so, where, and what is still intact."""
    if not is_disk_full(exc):
        return
    try:
        usage = shutil.disk_usage(Path(where).parent)
        free = f"{usage.free / 2**20:.0f} MB free there now"
    except OSError:
        free = "free space unknown"
    raise CaptuneError(
        f"the disk is full: writing {where} failed ({free}; {_first_line(exc)}). {intact}. Free some space (or "
        "point --output at a larger disk) and run again", 1) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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


def save_checkpoint(accelerator, run_dir: Path, step: int, state: dict, keep_last: int, scheduler=None) -> Path:
    """Write a resumable checkpoint on every process (each saves its RNG state), then publish it atomically.

    Args:
        accelerator: the run's Accelerator (no custom objects registered: see the module docstring).
        run_dir: the run directory.
        step: optimizer steps done; names the checkpoint.
        state: captune's own loop state (epoch, position, best score, metrics lines), stored as JSON.
        keep_last: how many complete checkpoints to keep.
        scheduler: the LR scheduler; its state_dict (plain numbers) goes into the JSON, not a pickle.

    Returns:
        The checkpoint directory.

    Raises:
        CaptuneError: the disk filled up (the partial checkpoint is removed; the previous ones are untouched).
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every process's RNG file is in before the rename publishes the checkpoint
        if accelerator.is_main_process:
            extra = {"scheduler": scheduler.state_dict()} if scheduler is not None else {}
            # Sizes and hashes of what is there now: resume verifies them (a few seconds a GB, at save time only).
            write_json(tmp / STATE_FILE, {"step": step, **state, **extra, "files": _manifest(tmp)})
    except BaseException as exc:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            last = latest_checkpoint(run_dir)
            raise_if_disk_full(exc, tmp, f"The last good checkpoint, {last}, is intact" if last else
                               "No earlier checkpoint exists")
        raise
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        prune_kept_best(run_dir)
    accelerator.wait_for_everyone()
    return final


def _manifest(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != STATE_FILE}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_damage(checkpoint: Path, process_index: int = 0) -> str | None:
    """What is wrong with a checkpoint's files (None when intact): unreadable state, a file missing, added, of the
    wrong size or hash, a pickle Accelerate would load with code execution allowed, or an unreadable RNG state."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{STATE_FILE} is unreadable ({_first_line(exc)})"
    pickles = sorted(p.name for p in checkpoint.glob("custom_checkpoint_*.pkl"))
    if pickles:
        return (f"it holds {', '.join(pickles)}, a pickle Accelerate would unpickle with code execution allowed; "
                "captune never loads those (a checkpoint from an older captune or from elsewhere)")
    files = state.get("files")
    if files is not None:  # checkpoints written before the manifest existed are not verified
        present = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*")
                   if p.is_file() and p.name != STATE_FILE}
        for name in sorted(set(files) - present):
            return f"{name} is missing"
        for name in sorted(present - set(files)):
            return f"{name} was not written by this checkpoint"
        for name, expected in sorted(files.items()):
            path = checkpoint / name
            if path.stat().st_size != expected["size"]:
                return f"{name} is {path.stat().st_size} bytes, {expected['size']} when saved"
            if _sha256(path) != expected["sha256"]:
                return f"{name} does not match the hash recorded when it was saved"
    rng = checkpoint / f"random_states_{process_index}.pkl"
    # Accelerate swallows a failure to load the RNG state and goes on without it: check it loads, first.
    if not rng.is_file() or rng.stat().st_size == 0:
        return f"{rng.name} is {'empty' if rng.is_file() else 'missing'}: the run could not continue exactly"
    from accelerate.utils import load

    try:
        load(rng)  # torch's weights-only unpickler (plus numpy's RNG state types): runs no code
    except Exception as exc:
        return f"{rng.name} is unreadable ({_first_line(exc)})"
    return None


def load_checkpoint(accelerator, checkpoint: Path) -> dict:
    """Verify a checkpoint, restore model, optimizer and RNG states, and return captune's loop state (with the
    scheduler's state_dict under "scheduler" when one was saved).

    Raises:
        CaptuneError: the checkpoint is damaged, or does not fit this model and configuration.
    """
    damage = checkpoint_damage(checkpoint, accelerator.process_index)
    if damage:
        raise CaptuneError(f"checkpoint {checkpoint} is damaged: {damage}")
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        # Every file Accelerate reads here goes through torch's weights-only unpickler or safetensors; custom
        # objects (the one weights_only=False path) were refused above.
        accelerator.load_state(str(checkpoint))
    except Exception as exc:  # SafetensorError, UnpicklingError, size mismatches: all "cannot restore"
        raise CaptuneError(
            f"checkpoint {checkpoint} cannot be restored ({_first_line(exc)}): was the configuration (model, "
            "train.mode) changed since it was written? Delete it to resume from an older one"
        ) from exc
    state.pop("files", None)
    return state


RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json", CHECKPOINTS, "best", "last")
"""What a run directory holds once `captune train` has written to it."""


def existing_run(run_dir: str | Path) -> list[str]:
    """The run files already in `run_dir` (empty for a new or empty directory)."""
    return [name for name in RUN_MARKERS if (Path(run_dir) / name).exists()]


def clear_run_state(run_dir: Path) -> None:
    """A fresh run (--overwrite) in an existing directory: drop what the earlier run wrote, so nothing mixes with
    the new run and no stale best/ describes it."""
    old = Path(run_dir) / CHECKPOINTS
    if old.is_dir() and any(old.iterdir()):
        log.warning("starting afresh in %s: removing its old checkpoints (pass --resume to continue a run)", run_dir)
        shutil.rmtree(old)
    for name in ("best", "last"):
        shutil.rmtree(Path(run_dir) / name, ignore_errors=True)
    (Path(run_dir) / "metrics.jsonl").unlink(missing_ok=True)


def saved_step(model_dir: Path) -> int | None:
    """The training step a captune model directory was saved at (captune.json "step"), None when unknown."""
    try:
        return json.loads((Path(model_dir) / SETTINGS_FILE).read_text(encoding="utf-8")).get("step")
    except (OSError, ValueError, AttributeError):
        return None


def _kept_best(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"best-step-{step:08d}"


def _referenced_best_steps(run_dir: Path) -> set:
    steps = set()
    for checkpoint in checkpoint_dirs(run_dir):
        try:
            steps.add(json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8")).get("best_step"))
        except (OSError, ValueError):
            pass
    return steps


def keep_best_for_resume(run_dir: Path) -> None:
    """Before best/ is replaced: if a checkpoint names the current best/ as its best, keep it (hard links, no copy
    of the bytes) in checkpoints/best-step-N, so resuming from that checkpoint can put it back."""
    best = Path(run_dir) / "best"
    step = saved_step(best)
    if step is None or step not in _referenced_best_steps(run_dir):
        return
    kept = _kept_best(run_dir, step)
    if not kept.exists():
        tmp = _new_sibling_dir(kept, ".tmp")
        shutil.rmtree(tmp)
        shutil.copytree(best, tmp, copy_function=os.link)
        tmp.rename(kept)


def prune_kept_best(run_dir: Path) -> None:
    """Drop kept best/ copies that no remaining checkpoint refers to."""
    root = Path(run_dir) / CHECKPOINTS
    referenced = _referenced_best_steps(run_dir)
    for kept in root.glob("best-step-*"):
        match = re.fullmatch(r"best-step-(\d+)", kept.name)
        if match and int(match.group(1)) not in referenced:
            shutil.rmtree(kept, ignore_errors=True)


def restore_best(run_dir: Path, best_step: int | None) -> None:
    """After a resume: make best/ the model of the restored `best_step`.

    best/ may have been replaced after the checkpoint was written (a later validation improved, then the run was
    killed); the resumed run must not report one step as best while best/ holds another.
    """
    best = Path(run_dir) / "best"
    restore_interrupted_swap(best)
    if not best.is_dir() or saved_step(best) == best_step or saved_step(best) is None:
        return  # nothing there, already right, or written by a captune that did not record steps
    if best_step is None:
        log.warning("removing %s: it was saved after the checkpoint this run resumes from", best)
        shutil.rmtree(best)
        return
    kept = _kept_best(run_dir, best_step)
    if not kept.is_dir():
        log.warning("%s holds step %s, but the restored run's best is step %d, which was not kept", best,
                    saved_step(best), best_step)
        return
    tmp = _new_sibling_dir(best, ".tmp")
    shutil.rmtree(tmp)
    shutil.copytree(kept, tmp, copy_function=os.link)
    swap_in(tmp, best)
    log.info("restored %s to the model of step %d (the resumed checkpoint's best)", best, best_step)


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Remove what a killed save left half-written: temporary checkpoints and model directories."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for tmp in [*root.glob(".tmp-step-*"), *root.glob(".best-step-*.tmp")]:
            shutil.rmtree(tmp, ignore_errors=True)
    for name in ("best", "last"):
        restore_interrupted_swap(Path(run_dir) / name)
        for tmp in Path(run_dir).glob(f".{name}.*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)


def export_merged(source: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Write a plain transformers model directory (LoRA merged in) that `from_pretrained` loads without captune.

    Never deletes what captune did not write: a non-empty `output` is refused unless `overwrite`, and even then only
    a model directory (config.json / adapter_config.json / captune.json at its top) is replaced.

    Args:
        source: a run directory (its best/ is exported) or a model/adapter directory.
        output: the directory to write.
        overwrite: replace an existing model directory at `output`.

    Raises:
        CaptuneError: `source` holds no model; `output` is a file, lies inside (or contains) `source`, or is a
            non-empty directory (without `overwrite`, or one that is not a model directory).
    """
    from .model import load_captune_settings, load_model_and_processor

    run = Path(source)
    source = run / "best" if (run / "best").is_dir() else run
    if not source.is_dir():
        raise CaptuneError(f"export: {source} is not a run or model directory")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise CaptuneError(f"export --output {output} is a file: pass a directory to write the model into")
    here, there = run.resolve(), output.resolve()
    if there == here or there.is_relative_to(here) or here.is_relative_to(there):
        raise CaptuneError(f"export --output {output} is {'inside' if there != here else 'the same as'} the source "
                           f"{run}" + (" or contains it" if here.is_relative_to(there) and here != there else "")
                           + ": choose a directory outside the run")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise CaptuneError(f"export --output {output} is not empty: choose a new directory, or pass --overwrite "
                               "to replace the model directory there")
        if not any((output / marker).is_file() for marker in ("config.json", "adapter_config.json", SETTINGS_FILE)):
            raise CaptuneError(f"export --output {output} holds files but no model (no config.json): captune will "
                               "not delete them even with --overwrite; choose another directory")
    model, processor = load_model_and_processor(str(source))
    settings = load_captune_settings(str(source))
    settings.pop("adapter", None)
    save_model(model, processor, output, settings or None)
    return output


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
