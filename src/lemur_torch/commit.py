"""How a folder of files becomes visible as complete, exactly once: the commit protocol of checkpoints and
HF exports, for every backend and every kind of storage.

A folder is complete if and only if its marker file exists (`meta.json` for a checkpoint, `lemur_export.json`
for an export). The marker is written last, after every other file and folder has been fsynced, so after a
crash or a power loss a folder with its marker is whole, and a folder without it is garbage.

Two modes (`checkpoint.commit`):
- `rename` (POSIX file systems: local disks, NFS, Lustre, GPFS): the files are written into a staging folder
  next to the final one (`.tmp-<name>`); the marker is written into it last and the folder is renamed into
  place, then the parent folder is fsynced so that the rename itself is durable. Readers never see a partial
  folder under the final name.
- `marker` (object stores and gcsfuse, where renaming a folder copies every object and is not atomic): the
  files are written in place into the final folder and the marker last. Readers must check the marker.

Deleting or replacing a folder removes its marker first, so an interrupted delete leaves an incomplete folder,
never one that looks complete. `recover` (run once at start by one process) finishes the commits a crash
interrupted between the marker and the rename, and removes every incomplete folder.
"""

from __future__ import annotations

import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Pattern

MODES = ("rename", "marker")
STAGING_PREFIX = ".tmp-"
FSYNC_THREADS = 16  # fsyncs in flight at once when committing a folder


def write_durable(path: str, data: bytes) -> None:
    """Write `data` to `path` and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    """Make a folder's entries (files created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str, files: bool = True) -> None:
    """fsync every folder under `root`, bottom-up with `root` last, and before them every file (`files`), which
    makes a folder durable whoever wrote its files. Files are synced by a pool of threads (fsync releases the
    interpreter lock): on a network file system each one is a round trip."""
    paths, dirs = [], []
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        paths += [os.path.join(dirpath, name) for name in filenames] if files else []
        dirs.append(dirpath)
    with ThreadPoolExecutor(max_workers=FSYNC_THREADS) as pool:
        list(pool.map(_fsync_file, paths))
    for d in dirs:  # bottom-up: root last
        fsync_dir(d)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown commit mode {mode!r}; use rename or marker")
    return mode


def staging_path(final: str, mode: str) -> str:
    """Where the files of `final` are written before the commit."""
    if check_mode(mode) == "marker":
        return final
    parent, name = os.path.split(os.path.normpath(final))
    return os.path.join(parent, STAGING_PREFIX + name)


def is_complete(folder: str, marker: str) -> bool:
    return os.path.isfile(os.path.join(folder, marker))


def remove(folder: str, marker: str) -> None:
    """Delete a folder, its marker first (and durably), so that an interrupted delete never leaves a folder
    that looks complete."""
    marker_path = os.path.join(folder, marker)
    if os.path.exists(marker_path):
        os.remove(marker_path)
        fsync_dir(folder)
    shutil.rmtree(folder)


def begin(final: str, mode: str, marker: str) -> str:
    """Create the empty folder the files of `final` are written into (one process calls this); returns it.
    A leftover staging folder of the same name is an interrupted write of ours: it is removed. In marker mode
    the staging folder is `final` itself, so a complete folder already there is removed (marker first)."""
    staging = staging_path(final, mode)
    if os.path.lexists(staging):
        remove(staging, marker)
    os.makedirs(staging)
    return staging


def commit(staging: str, final: str, mode: str, marker: str, marker_content: bytes, files_synced: bool = False) -> None:
    """Make `final` visible as complete: fsync everything in `staging`, write the marker last, then (rename
    mode) rename `staging` to `final`, replacing a complete folder of that name. The caller guarantees that
    every process has finished writing into `staging`; with `files_synced`, also that each file was fsynced by
    its writer (a checkpoint's: DCP's writer and write_durable, before rank 0 hears that the writes are done),
    so only the folders are synced here and the commit does not grow with the number of ranks that wrote."""
    fsync_tree(staging, files=not files_synced)
    write_durable(os.path.join(staging, marker), marker_content)
    fsync_dir(staging)
    if check_mode(mode) == "rename":
        if os.path.lexists(final):
            # a crash from here to the rename leaves `final` incomplete and `staging` complete: recover() rolls
            # the rename forward, so the newer folder is never lost
            remove(final, marker)
        os.replace(staging, final)
        fsync_dir(os.path.dirname(os.path.abspath(final)))


def recover(directory: str, marker: str, final_name: Pattern[str], log: Callable[[str], None]) -> None:
    """Once at start, by one process, before anything else writes into `directory`: finish each commit that
    was interrupted after its marker (rename it into place), and remove every incomplete folder whose name
    matches `final_name` or is its staging name. Each action is logged."""
    if not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not os.path.isdir(path):
            continue
        if name.startswith(STAGING_PREFIX) and re.match(final_name, name[len(STAGING_PREFIX) :]):
            final = os.path.join(directory, name[len(STAGING_PREFIX) :])
            if is_complete(path, marker):
                if os.path.lexists(final):
                    remove(final, marker)
                os.replace(path, final)
                fsync_dir(directory)
                log(f"checkpoint: finished the interrupted commit of {final} (its files and {marker} were complete)")
            else:
                remove(path, marker)
                log(f"checkpoint: removed {path}, an interrupted save (no {marker})")
        elif re.match(final_name, name) and not is_complete(path, marker):
            remove(path, marker)
            log(f"checkpoint: removed {path}, incomplete (no {marker}: an interrupted save or delete)")
