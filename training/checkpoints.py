"""Checkpoint folders that appear whole or not at all.

A training run killed at any moment (between steps, in the middle of a save, while old checkpoints are deleted) must
resume from its last complete checkpoint. So a checkpoint is written into a staging folder, `tmp-checkpoint-<step>`,
flushed to disk, and renamed to `checkpoint-<step>` when every file is in it: a folder named `checkpoint-<step>` is
always complete. Deleting one (rotation) renames it away first, so a half-deleted folder never keeps the name either.
The staging names do not match the `checkpoint-*` pattern that transformers' `get_last_checkpoint` and rotation read.

For folders written by other code (the stock `Trainer` writes in place), `is_complete_checkpoint` also asks for a
`trainer_state.json` that parses (the Trainer writes it last) and no `checkpoint-is-incomplete.txt` (the sentinel of
transformers' just-in-time checkpoints).
"""

import json
import os
import re
import shutil
from pathlib import Path


CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR
STAGING_PREFIX = "tmp-checkpoint"  # a checkpoint being written
DELETING_PREFIX = "deleted-checkpoint"  # a checkpoint being deleted or replaced
STATE_FILE = "trainer_state.json"  # written last into every checkpoint
INCOMPLETE_MARKER = "checkpoint-is-incomplete.txt"  # transformers' just-in-time checkpoint sentinel

_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")


def checkpoint_step(folder: str | os.PathLike) -> int | None:
    """The step of a folder named `checkpoint-<step>`, else None."""
    match = _CHECKPOINT_NAME.match(Path(folder).name)
    return None if match is None else int(match.group(1))


def incomplete_reason(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete checkpoint (a short phrase), or None when it is one."""
    folder = Path(folder)
    if not folder.is_dir():
        return "it is not a folder"
    if (folder / INCOMPLETE_MARKER).exists():
        return f"it holds {INCOMPLETE_MARKER}"
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except FileNotFoundError:
        return f"it has no {STATE_FILE}"
    except (OSError, ValueError):
        return f"its {STATE_FILE} is truncated or unreadable"
    if not isinstance(state, dict):
        return f"its {STATE_FILE} is not a JSON object"
    return None


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a `checkpoint-<step>` folder with every file of the checkpoint in it."""
    return checkpoint_step(folder) is not None and incomplete_reason(folder) is None


def checkpoint_folders(run_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-<step>` folders of `run_dir`, complete or not, by step (oldest first)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    folders = [path for path in run_dir.iterdir() if checkpoint_step(path) is not None and path.is_dir()]
    return sorted(folders, key=checkpoint_step)


def last_complete_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint of `run_dir` with the highest step, or None: the one a run resumes from."""
    complete = [folder for folder in checkpoint_folders(run_dir) if incomplete_reason(folder) is None]
    return complete[-1] if complete else None


def staging_folder(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of `step` is written before `publish_checkpoint` renames it into place."""
    return Path(run_dir) / f"{STAGING_PREFIX}-{step}"


def remove_leftovers(run_dir: str | os.PathLike) -> None:
    """Deletes the staging and deleting folders that a killed run left in `run_dir`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for path in run_dir.iterdir():
        if path.name.startswith((f"{STAGING_PREFIX}-", f"{DELETING_PREFIX}-")) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _fsync(path: Path) -> None:
    # A rename is atomic, but after a power cut the renamed folder could hold files whose data never reached the disk.
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        descriptor = os.open(path, flags)
    except OSError:
        return  # e.g. folders cannot be opened on Windows
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def _set_aside(folder: Path) -> Path:
    """Renames `folder` to a `deleted-checkpoint-...` name beside it and returns that name."""
    aside = folder.with_name(f"{DELETING_PREFIX}-{folder.name}")
    if aside.exists():
        shutil.rmtree(aside)
    folder.rename(aside)
    return aside


def publish_checkpoint(staged: str | os.PathLike, final: str | os.PathLike) -> Path:
    """
    Moves the finished checkpoint `staged` to `final` (`.../checkpoint-<step>`) in one rename, after flushing its
    files to disk. A folder already at `final` (a run that resumed from an earlier checkpoint saves that step again)
    is set aside first and deleted after.
    """
    staged, final = Path(staged), Path(final)
    _fsync_tree(staged)
    replaced = _set_aside(final) if final.exists() else None
    staged.rename(final)
    _fsync(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return final


def delete_checkpoint(folder: str | os.PathLike) -> None:
    """Deletes a checkpoint folder; its name goes first, so that a kill midway leaves no half-deleted checkpoint."""
    try:
        aside = _set_aside(Path(folder))
    except FileNotFoundError:
        return  # another process (a node-local save) deleted it
    shutil.rmtree(aside, ignore_errors=True)


def rotate_checkpoints(ordered: list[Path], save_total_limit: int | None, protected=()) -> None:
    """
    Deletes the oldest checkpoints of `ordered` (oldest first) until `save_total_limit` are left, never one in
    `protected` (the checkpoint just written, the best one). No deletion when `save_total_limit` is None or below 1.
    """
    if not save_total_limit or save_total_limit < 1:
        return
    protected = {Path(path).resolve() for path in protected if path is not None}
    remaining = len(ordered)
    for folder in ordered:
        if remaining <= max(save_total_limit, len(protected)):
            break
        if Path(folder).resolve() not in protected:
            delete_checkpoint(folder)
            remaining -= 1


__all__ = [
    "CHECKPOINT_PREFIX",
    "checkpoint_folders",
    "checkpoint_step",
    "delete_checkpoint",
    "incomplete_reason",
    "is_complete_checkpoint",
    "last_complete_checkpoint",
    "publish_checkpoint",
    "remove_leftovers",
    "rotate_checkpoints",
    "staging_folder",
]
