"""`captune caption`: caption files, folders and globs in batches and write text, TSV, JSONL, CSV or sidecar files.

Exit codes: 0 when every image was captioned; 1 when some input was missing or unreadable (each reported on one
stderr line; the others are still captioned and written); 2 for errors that stop the run (no images at all, bad
model, bad options). stdout carries only captions (or the chosen format), so it can be piped.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from tqdm.auto import tqdm

from .errors import CaptuneError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
FORMATS = ("text", "tsv", "jsonl", "csv", "sidecar")
GLOB_CHARS = set("*?[")


@dataclass
class Inputs:
    """Images to caption, in order, and the inputs that named nothing usable (input, reason)."""

    files: list[Path] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)


def parse_extensions(text: str | None) -> tuple[str, ...]:
    """`"jpg,.PNG"` -> `("jpg", "png")`; None -> the common image extensions."""
    if not text:
        return IMAGE_EXTENSIONS
    extensions = tuple(part.strip().lower().lstrip(".") for part in text.split(",") if part.strip())
    if not extensions:
        raise CaptuneError(f"--ext {text!r} names no extension; pass e.g. --ext jpg,png")
    return extensions


def expand_inputs(inputs: list[str], extensions: tuple[str, ...]) -> Inputs:
    """Expand files, directories (recursively, filtered by extension) and globs into image paths.

    A file named explicitly is taken whatever its extension (the user asked for it); directory contents and glob
    matches are filtered by `extensions`. Paths are kept as given (not resolved), in input order, directory and glob
    contents sorted; a file reached twice is captioned once.
    """
    result = Inputs()
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            result.files.append(path)

    def wanted(path: Path) -> bool:
        return path.suffix.lower().lstrip(".") in extensions

    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and wanted(p))
            if not found:
                result.failures.append((text, f"no files with extension {','.join(extensions)} in this directory"))
            for item in found:
                add(item)
        elif path.is_file():
            add(path)
        elif GLOB_CHARS & set(text):
            matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(text), recursive=True))]
            found = []
            for match in matches:
                if match.is_dir():
                    found.extend(sorted(p for p in match.rglob("*") if p.is_file() and wanted(p)))
                elif match.is_file() and wanted(match):
                    found.append(match)
            if not found:
                result.failures.append((text, f"the pattern matches no files with extension {','.join(extensions)}"))
            for item in found:
                add(item)
        else:
            result.failures.append((text, "no such file or directory"))
    return result


def sidecar_path(image: Path) -> Path:
    """Where a sidecar caption goes: beside the image, same stem, `.txt` (the kohya / SD-trainer convention)."""
    return image.with_suffix(".txt")


def run_caption(captioner, inputs: list[str], options, *, fmt: str = "text", output: str | None = None,
                extensions: tuple[str, ...] = IMAGE_EXTENSIONS, overwrite: bool = False, batch_size: int = 16,
                progress: bool = True, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Caption `inputs` with `captioner` and write them in `fmt`; returns the exit code (see module docstring).

    Raises:
        CaptuneError: bad format/output combination, or no image found at all.
    """
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if fmt not in FORMATS:
        raise CaptuneError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "sidecar" and output:
        raise CaptuneError("--output does not apply to --format sidecar (captions go beside each image)")
    found = expand_inputs(inputs, extensions)
    for text, reason in found.failures:
        print(f"captune: skipped {text}: {reason}", file=stderr)
    if not found.files:
        raise CaptuneError("no images to caption: every input was missing or matched nothing (see the lines above)")

    files, kept, clashes = found.files, 0, []
    if fmt == "sidecar":
        files, kept, clashes = _sidecar_plan(files, overwrite)
        for path, reason in clashes:
            print(f"captune: skipped {path}: {reason}", file=stderr)
    failed = len(found.failures) + len(clashes)
    written = 0

    sink = _open_sink(output, stdout)
    try:
        writer = _Writer(fmt, sink.handle)
        with tqdm(total=len(files), desc="captioning", unit="img", file=stderr, disable=not progress,
                  leave=False) as bar:
            for start in range(0, len(files), batch_size):
                chunk = files[start:start + batch_size]
                paths, images = [], []
                for path in chunk:
                    try:
                        images.append(_load(path))
                        paths.append(path)
                    except CaptuneError as exc:
                        failed += 1
                        bar.write(f"captune: skipped: {exc}", file=stderr)
                for path, caption in zip(paths, captioner.caption_decoded(images, options, batch_size=batch_size)):
                    if fmt == "sidecar":
                        _write_atomic(sidecar_path(path), caption + "\n")
                    else:
                        writer.write(path, caption)
                    written += 1
                bar.update(len(chunk))
        sink.commit()
    finally:
        sink.discard()

    if fmt == "sidecar":
        note = " (pass --overwrite to replace them)" if kept else ""
        print(f"captune: sidecar captions: wrote {written}, kept {kept} existing{note}, failed {failed}", file=stderr)
    elif failed:
        print(f"captune: captioned {written} image(s); {failed} input(s) failed", file=stderr)
    return 1 if failed else 0


def _load(path: Path):
    from .data.records import load_rgb

    return load_rgb(path, origin=str(path))


def _sidecar_plan(files: list[Path], overwrite: bool):
    """Drop images whose sidecar exists (unless overwriting) and images whose sidecar another image claims."""
    todo, kept, clashes = [], 0, []
    owners: dict[Path, Path] = {}
    for path in files:
        target = sidecar_path(path)
        owner = owners.setdefault(target.resolve(), path)
        if owner != path:
            clashes.append((path, f"its sidecar {target} also belongs to {owner} (same name, other extension)"))
        elif target.exists() and not overwrite:
            kept += 1
        else:
            todo.append(path)
    return todo, kept, clashes


class _Writer:
    """Writes one (path, caption) row in the chosen format."""

    def __init__(self, fmt: str, handle: TextIO):
        self.fmt = fmt
        self.handle = handle
        self.csv = csv.writer(handle) if fmt == "csv" else None
        if self.csv:
            self.csv.writerow(["path", "caption"])

    def write(self, path: Path, caption: str) -> None:
        if self.fmt == "text":
            self.handle.write(caption + "\n")
        elif self.fmt == "tsv":
            self.handle.write(f"{path}\t{caption}\n")
        elif self.fmt == "jsonl":
            self.handle.write(json.dumps({"path": str(path), "caption": caption}, ensure_ascii=False) + "\n")
        elif self.fmt == "csv":
            self.csv.writerow([str(path), caption])
        else:
            raise AssertionError(self.fmt)
        # Streamed to a terminal or pipe, captions show up batch by batch rather than at the end.
        self.handle.flush()


class _Sink:
    """stdout, or a temporary file beside `--output` renamed into place only when the run completes."""

    def __init__(self, handle: TextIO, target: Path | None = None, temp: str | None = None):
        self.handle, self.target, self.temp = handle, target, temp

    def commit(self) -> None:
        if self.target is not None:
            self.handle.close()
            os.replace(self.temp, self.target)
            self.temp = None

    def discard(self) -> None:
        if self.temp is not None:
            self.handle.close()
            os.unlink(self.temp)
            self.temp = None


def _open_sink(output: str | None, stdout: TextIO) -> _Sink:
    if not output:
        return _Sink(stdout)
    target = Path(output)
    if target.is_dir():
        # Checked before any captioning: the finished captions would otherwise be thrown away at the rename.
        raise CaptuneError(f"--output {output} is a directory: name a file (e.g. {target / 'captions.txt'})")
    if not target.parent.is_dir():
        raise CaptuneError(f"--output {output}: directory {target.parent} does not exist")
    try:
        fd, temp = _mkstemp_like(target)
    except PermissionError as exc:
        raise CaptuneError(f"--output {output}: cannot write in {target.parent} ({exc.strerror})") from exc
    return _Sink(os.fdopen(fd, "w", encoding="utf-8", newline=""), target, temp)


def _mkstemp_like(target: Path) -> tuple[int, str]:
    """A temporary file beside `target` with the mode `target` has (or a new file would get from the umask).

    mkstemp creates 0600 files; renamed into place unchanged they would leave captions, sidecars and --overwrite'n
    files readable by their owner only, whatever the umask says.
    """
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        mode = target.stat().st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        mode = 0o666 & ~mask
    os.fchmod(fd, mode)
    return fd, temp


def _write_atomic(path: Path, text: str) -> None:
    fd, temp = _mkstemp_like(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
