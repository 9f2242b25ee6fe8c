"""Atomic writes: a file or directory appears complete under its final name, or not at all.

Directories are written in a hidden staging folder beside the final one and renamed into place
at the end, under a lock that a second writer of the same folder cannot take; `--overwrite`
replaces only a folder this toolkit wrote (one holding its `marker` file), and the final rename
never replaces a folder that appeared while the work ran. Staging folders that an interrupted run
(SIGKILL, power loss) left behind are removed by the next run of the same output, which says so.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from instaflow_edge.errors import UserError

logger = logging.getLogger(__name__)

# the folders this process has renamed into place, complete (an interrupt after that loses nothing)
COMMITTED: set[Path] = set()
# the staging folders this process is writing now: the only ones any reader may open
STAGING: set[Path] = set()
PARTIAL, OLD = ".partial-", ".old-"  # in the names of hidden folders of unfinished, replaced work


def unfinished(path: Path) -> bool:
    """Whether `path` is a staging folder that some other (perhaps killed) run left: never a
    finished output, whatever it holds."""
    path = Path(path)
    named = path.name.startswith(".") and any(part in path.name for part in (PARTIAL, OLD))
    return named and path.resolve() not in STAGING


@contextmanager
def atomic_directory(
    final: Path, overwrite: bool = False, marker: str | None = None
) -> Iterator[Path]:
    """Yield a staging directory beside `final`; rename it into place only if the block succeeds.

    `marker`: the file that makes an existing `final` one of ours (e.g. "manifest.json"); with
    it, `overwrite` refuses to replace a folder that lacks it.
    """
    final = Path(final)
    check_writable(final.parent)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _writer_lock(final):
        existed = _check_existing(final, overwrite, marker)
        _remove_stale_staging(final)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}{PARTIAL}", dir=final.parent))
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is ordinary
        STAGING.add(staging.resolve())
        try:
            yield staging
            if final.exists() and not existed:
                raise UserError(f"{final} appeared while this ran: nothing was replaced")
            _replace(staging, final)
            COMMITTED.add(final.resolve())
        finally:
            STAGING.discard(staging.resolve())
            if staging.exists():
                shutil.rmtree(staging)


def check_replaceable(final: Path, overwrite: bool, marker: str | None = None) -> bool:
    """Whether `final` exists; refuse it unless it may be replaced (commands call this before
    long work too, so that a refusal comes first)."""
    check_writable(final.parent)
    return _check_existing(final, overwrite, marker)


def _check_existing(final: Path, overwrite: bool, marker: str | None) -> bool:
    """`check_replaceable` once its folder is known to be writable."""
    if not final.exists() and not final.is_symlink():
        return False
    if not overwrite:
        raise UserError(f"{final} already exists: choose another --out or pass --overwrite")
    if final.is_symlink() or not final.is_dir():
        raise UserError(f"{final} is not a folder this toolkit wrote: refusing to replace it")
    if marker is not None and not (final / marker).is_file():
        raise UserError(
            f"{final} is not a folder this toolkit wrote (it has no {marker}): refusing to "
            "replace it; choose another --out"
        )
    return True


def check_writable(folder: Path, flag: str = "--out") -> None:
    """Refuse, as a user's mistake, a folder that can be neither made nor written: the nearest of
    it and its parents that exists is not a folder, or takes no new entries (read-only, no
    permission, a kernel file system). Commands call it before long work, so that an output
    nobody can write is refused first, not after the work. `flag` is the option that chose it."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(
            f"cannot write into {folder}: {existing} is not a folder; choose another {flag}"
        )
    try:
        tempfile.TemporaryDirectory(prefix=".instaflow-edge-probe-", dir=existing).cleanup()
    except OSError as error:
        raise UserError(
            f"cannot write into {folder}: {existing} takes no new files ({error.strerror}); "
            f"choose another {flag}"
        ) from None


def _replace(staging: Path, final: Path) -> None:
    """Move the old folder aside, the new one into place, then delete the old one: at every
    moment one complete version exists under a name."""
    if not final.exists():
        os.replace(staging, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}{OLD}", dir=final.parent))
    os.replace(final, old / final.name)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def scratch_directory(final: Path, what: str) -> Iterator[Path]:
    """A folder beside `final` for intermediate work (`what` names it), removed at the end. It is
    named as a staging folder, so a killed run's is refused by every reader and removed by the
    next write of `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}{PARTIAL}{what}-", dir=final.parent))
    STAGING.add(scratch.resolve())
    try:
        yield scratch
    finally:
        STAGING.discard(scratch.resolve())
        shutil.rmtree(scratch, ignore_errors=True)


def _remove_stale_staging(final: Path) -> None:
    """Remove the staging folders an interrupted run left beside `final` (not this process's)."""
    stale = [
        path
        for pattern in (f".{final.name}{PARTIAL}*", f".{final.name}{OLD}*")
        for path in final.parent.glob(pattern)
        if path.is_dir() and not path.is_symlink() and path.resolve() not in STAGING
    ]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    if stale:
        logger.info(
            "removed %d unfinished folder(s) an interrupted run left beside %s", len(stale), final
        )


@contextmanager
def _writer_lock(final: Path) -> Iterator[None]:
    """An exclusive lock on writing `final`: a second writer fails at once, in one line."""
    path = final.parent / f".{final.name}.lock"
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another run is writing {final} right now") from None
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    handle, name = tempfile.mkstemp(prefix=f".{final.name}{PARTIAL}", dir=final.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        staging.chmod(0o666 & ~_umask())  # mkstemp makes it private; the result is ordinary
        os.replace(staging, final)
    finally:
        staging.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
