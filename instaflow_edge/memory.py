"""The process's memory: its peak during a block, a field of /proc/PID/status, and handing freed
memory and a mapped file's pages back to the system (Linux; None or a no-op elsewhere)."""

from __future__ import annotations

import ctypes
import functools
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def peak_memory() -> Iterator[dict[str, float | None]]:
    """The process's peak resident memory during the block above its resident memory at the
    start, in MiB (`peak_rss_mib`): Linux's VmHWM, reset on entry through /proc/self/clear_refs;
    None where that is not possible."""
    measured: dict[str, float | None] = {"peak_rss_mib": None}
    try:
        Path("/proc/self/clear_refs").write_text("5")
        start = status_mib("VmRSS")
    except OSError:
        start = None
    yield measured
    peak = status_mib("VmHWM")
    if start is not None and peak is not None:
        measured["peak_rss_mib"] = peak - start


def status_mib(field: str, process: int | str = "self") -> float | None:
    """A memory field of /proc/PROCESS/status in MiB (None where there is none)."""
    try:
        lines = Path(f"/proc/{process}/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**10
    return None


def return_freed_memory() -> None:
    """Free what only reference cycles still hold (a traced graph's, say), then hand the memory
    Python and the libraries freed back to the system (glibc's malloc_trim): freed small blocks
    otherwise stay in the process's heap and count in its resident memory until the next peak is
    added on top of them."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def drop_mapped_pages(path: Path) -> None:
    """Hand back the pages of `path` that this process's read-only mappings of it hold resident
    (madvise MADV_DONTNEED); a page touched again is read again from the file, the same bytes.

    OpenVINO maps an IR's weights file and keeps it mapped for as long as the model or a model
    compiled from it lives, while its CPU plugin computes from a copy of its own: every page it
    read while compiling stays resident for nothing (sd15's fp32 UNet: 3.3 GiB beside the
    plugin's 3.3). OpenVINO has no option that frees them: without its mapping (ENABLE_MMAP
    off) the compiled model keeps the weights on the heap instead."""
    madvise, mappings = _madvise(), Path("/proc/self/maps")
    if madvise is None or not mappings.exists():
        return
    target = str(Path(path).resolve())
    for line in mappings.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[5] != target or "w" in fields[1]:
            continue  # only read-only mappings: nothing written there can be lost
        start, end = (int(address, 16) for address in fields[0].split("-"))
        madvise(start, end - start, _MADV_DONTNEED)


_MADV_DONTNEED = 4  # Linux's value, the same on every architecture


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    """The C library's madvise with its argument types (None where there is none)."""
    try:
        madvise = ctypes.CDLL(None).madvise
    except (AttributeError, OSError, TypeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim from the C library this process already runs (None elsewhere), looked
    up once: `ctypes.util.find_library` would start a subprocess on every call."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # not glibc; no process handle (Windows)
        return None
