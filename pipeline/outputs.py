"""Output folders replaced whole.

A run writes into ``<parent>/.<name>.partial`` beside its output ``<parent>/<name>`` and swaps it
in only once everything is written, so an interrupted run never leaves its new files beside the
old ones: the previous output stays as it was, and what the stopped run had written stays in the
partial folder (for a look, or to resume from) until the next run into the same output clears it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)


def output_folder(path: str | Path, flag: str = "--out") -> Path:
    """``path`` made absolute, refused in one line when it, or a folder it would sit in, is a file."""
    path = Path(os.path.abspath(path))
    if not path.name:
        raise UserError(f"{flag} {path}: name a folder below the filesystem root")
    for p in (path, *path.parents):
        if p.is_dir():
            break
        if p.exists():
            where = "is an existing file" if p == path else f"would be inside {p}, which is a file"
            raise UserError(f"{flag} {path} {where}; an output is a folder: choose another {flag} or move the file")
    return path


def check_replaceable(out: Path, entries: set[str], flag: str = "--out") -> None:
    """Refuse an existing ``out`` holding anything a run would not write there itself (besides DVC's
    ``.gitignore``): the run replaces the folder whole, so ``--out .`` must not take a project."""
    if not out.is_dir():
        return
    others = sorted(e.name for e in out.iterdir() if e.name not in entries | {".gitignore"})
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise UserError(f"{flag} {out} holds {shown}, which this run does not write, and the run replaces the folder "
                        f"whole; choose a new or empty {flag}, or the output of an earlier run")


def remove_partial(out: Path) -> None:
    """Remove the partial folder of ``out`` (a run that stopped before writing anything worth keeping)."""
    _remove(partial_path(out))


def partial_path(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _old_path(out: Path) -> Path:
    return out.parent / f".{out.name}.old"


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def begin_output(out: Path, keep: Path | None = None) -> Path:
    """A fresh partial folder for ``out``, cleared of what a stopped run left there except ``keep``
    (a file inside it that the new run has read and must survive until the run writes its own)."""
    old = _old_path(out)
    if os.path.lexists(old):  # a run stopped between the two renames of ``publish_output``
        if os.path.lexists(out):
            _remove(old)
        else:
            os.rename(old, out)
            log.warning("%s restored from %s, where an interrupted run had moved it", out, old)
    partial = partial_path(out)
    kept = None
    if keep is not None and Path(os.path.abspath(keep)).is_relative_to(partial):
        kept = Path(os.path.abspath(keep)).relative_to(partial).parts[0]
    if partial.is_dir() and not partial.is_symlink():
        for entry in partial.iterdir():
            if entry.name != kept:
                _remove(entry)
    else:
        _remove(partial)
    try:
        partial.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out}: cannot create the folder {partial} ({err.strerror}); choose a writable --out") from None
    return partial


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(out: Path, partial: Path) -> None:
    """Entries of the old output the new one lacks (DVC's .gitignore, a user's notes) are linked
    into it, so replacing the folder loses nothing the run does not write. Links, not moves: the
    old output stays whole until the swap."""
    if not out.is_dir():
        return
    for entry in out.iterdir():
        target = partial / entry.name
        if os.path.lexists(target):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(target))


def publish_output(partial: Path, out: Path) -> None:
    """Put the finished ``partial`` folder at ``out``, replacing what was there."""
    _carry_over(out, partial)
    old = _old_path(out)
    # The old output is renamed aside, the new one renamed in, and only then the old one deleted.
    # A kill before the first rename leaves the old output in place, after the second the new one;
    # between the two (two system calls apart) neither is at ``out`` but both are whole on disk,
    # and the next ``begin_output`` puts the old one back. Deleting the old output first would
    # instead open a window as long as the deletion with no complete output anywhere.
    if os.path.lexists(out):
        os.rename(out, old)
    os.rename(partial, out)
    _remove(old)
