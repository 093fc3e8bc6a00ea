"""Checkpoints that are complete or ignored: a completion marker written last, verified before a resume.

`AtomicCheckpointMixin` goes in front of any Trainer subclass (SFT, reward model, DPO, ...). Each save
drops the folder's old marker, lets Trainer write everything, waits for every rank, then writes
`checkpoint_complete.json` (every file with its size) and only then rotates old checkpoints, so a crash at
any moment leaves the previous complete checkpoint in place. A full disk during a save removes the partial
folder and raises `CheckpointError` naming the folder and the space needed.

`find_resumable` picks the newest checkpoint whose marker is there and whose files are whole and readable,
and says which newer ones it skipped and why (naming the bad file).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

from component.config.errors import EXIT_INPUT, EXIT_IO, UserFacingError

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(UserFacingError):
    """A checkpoint could not be written (full disk) or none can be resumed from."""

    label = "checkpoint error"
    exit_code = EXIT_IO


class UnusableCheckpoint(CheckpointError):
    """`resume_from_checkpoint` names a checkpoint that is incomplete or damaged."""

    exit_code = EXIT_INPUT


def checkpoint_folders(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-N folder, newest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_marker(folder: str | os.PathLike, step: int) -> Path:
    """Record every file of a finished checkpoint with its size; written (atomically) last."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != COMPLETE_MARKER and not path.name.endswith(".tmp"):
            _fsync(path)  # the data is on disk before the marker says so (power loss, not only a crash)
            files[path.relative_to(folder).as_posix()] = path.stat().st_size
    marker = folder / COMPLETE_MARKER
    tmp = folder / (COMPLETE_MARKER + ".tmp")
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n", encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, marker)
    return marker


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return "has no safetensors header"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return "is truncated (header longer than the file)"
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return "has a corrupt safetensors header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + length + max(ends, default=0) > size:
        return f"is truncated ({size} bytes, its header describes {8 + length + max(ends)})"
    return None


def _file_problem(path: Path) -> str | None:
    """Why a checkpoint file cannot be loaded, or None. Cheap: headers and zip directories, not every byte."""
    try:
        if path.suffix == ".safetensors":
            return _safetensors_problem(path)
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix in (".pt", ".pth", ".bin") and path.stat().st_size > 0:
            with zipfile.ZipFile(path):  # torch.save's format: a cut file loses its zip directory
                pass
    except (ValueError, zipfile.BadZipFile, UnicodeDecodeError):
        return "is corrupt or truncated"
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    return None


def checkpoint_problem(folder: str | os.PathLike, require_marker: bool = True) -> str | None:
    """Why `folder` cannot be resumed from (naming the bad file), or None when it is complete and loadable."""
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    expected: dict[str, int] = {}
    if marker.is_file():
        try:
            expected = json.loads(marker.read_text(encoding="utf-8"))["files"]
        except (ValueError, KeyError, TypeError):
            return f"{marker} is corrupt"
    elif require_marker:
        return f"no {COMPLETE_MARKER} (the save was interrupted)"
    for name, size in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} is truncated or changed ({path.stat().st_size} bytes, {size} when saved)"
    if not (folder / TRAINER_STATE).is_file():
        return f"{folder / TRAINER_STATE} is missing"
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            problem = _file_problem(path)
            if problem:
                return f"{path} {problem}"
    return None


def find_resumable(output_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete, loadable checkpoint (or None) and the newer ones skipped, each with its reason.

    Checkpoints written before markers existed (none in the folder has one) are judged by their files alone.
    """
    folders = checkpoint_folders(output_dir)
    with_markers = any((f / COMPLETE_MARKER).is_file() for _, f in folders)
    skipped = []
    for _, folder in folders:
        problem = checkpoint_problem(folder, require_marker=with_markers)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC anywhere in the chain; safetensors' Rust writer reports it only in its message."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left" in text or "os error 28" in text or "StorageFull" in text or "Disk quota" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def folder_size(folder: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def disk_full_error(folder: Path, run_dir: str, error: BaseException) -> CheckpointError:
    """The partial folder removed; an error naming it, the free space and what one checkpoint needs."""
    partial = folder_size(folder) if folder.is_dir() else 0
    shutil.rmtree(folder, ignore_errors=True)  # half a checkpoint is worse than none; it also frees space
    previous, _ = find_resumable(run_dir)
    need = max(folder_size(previous) if previous else 0, partial)
    free = shutil.disk_usage(run_dir).free if os.path.isdir(run_dir) else 0
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    return CheckpointError(
        f"disk full while saving {folder}: {_human(free)} free, a checkpoint needs about {_human(need)} "
        f"({error.__class__.__name__}); {kept}. Free space (or lower save_total_limit), then rerun with "
        "--resume_from_checkpoint true"
    )


class AtomicCheckpointMixin:
    """Trainer mixin: checkpoints marked complete only when every rank has written every file.

    Use as `class MyTrainer(AtomicCheckpointMixin, Trainer)`; it only wraps `_save_checkpoint`.
    """

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = self._get_output_dir(trial=trial)
        folder = Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            (folder / COMPLETE_MARKER).unlink(missing_ok=True)  # rewriting a folder: incomplete until done
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotate only once the new checkpoint is complete (below)
        try:
            super()._save_checkpoint(model, trial)
        except Exception as error:
            if not is_disk_full(error):
                raise
            if self.args.should_save:
                raise disk_full_error(folder, run_dir, error) from error
            raise CheckpointError(f"disk full while saving {folder}") from error
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's RNG file is written
        if self.args.should_save:
            write_marker(folder, self.state.global_step)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
