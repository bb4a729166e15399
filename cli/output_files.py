"""Files and folders the commands write, each appearing whole or not at all.

A file is written under a temporary name in its own folder, flushed to disk, then renamed over its final name
(`os.replace`, atomic on one filesystem); a folder is written as a hidden sibling and renamed the same way. A run
killed at any moment leaves either the old entry, the new one, or nothing, plus at most a hidden `.NAME.partial`
that the next write of the same name replaces.
"""

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def partial_name(path: Path) -> Path:
    """The hidden temporary sibling under which `path` is written."""
    return path.with_name(f".{path.name}.partial")


def write_file_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """
    Calls `write(file)` on a binary file under a temporary name beside `path`, then renames it to `path`.

    Example: `write_file_atomically("out.png", lambda file: image.save(file, format="PNG"))`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_name(path)
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    """`path` with the UTF-8 `text`, whole or not at all (JSON results, records)."""
    return write_file_atomically(path, lambda file: file.write(text.encode("utf-8")))


def write_folder_atomically(folder: str | Path, write: Callable[[Path], None]) -> Path:
    """
    Calls `write(temporary_folder)` on a new hidden sibling of `folder`, then renames it to `folder`. An existing
    `folder` is replaced (moved aside first, removed after the rename).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_name(folder)
    shutil.rmtree(temporary, ignore_errors=True)  # the leftover of a run killed while writing
    try:
        write(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    replaced = folder.with_name(f".{folder.name}.replaced")
    shutil.rmtree(replaced, ignore_errors=True)
    if folder.exists():
        os.replace(folder, replaced)
    os.replace(temporary, folder)
    shutil.rmtree(replaced, ignore_errors=True)
    return folder


def move_folder_contents(source: Path, target: Path, last: tuple[str, ...] = ()) -> None:
    """
    Moves every entry of `source` into `target` (each one a rename, replacing an entry of the same name), the names in
    `last` after all others, then removes `source`. Used to put a finished checkpoint at a run's root, beside its
    `checkpoint-*` folders: moving `config.json` last means a root with a `config.json` holds all the other files.
    """
    entries = [entry for entry in source.iterdir() if entry.name not in last]
    entries += [source / name for name in last if (source / name).exists()]
    for entry in entries:
        destination = target / entry.name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(entry, destination)
    source.rmdir()


def clear_folder(folder: Path) -> None:
    """Removes everything inside `folder` (kept itself: it may be a mount point, or the working directory's child)."""
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
