"""Peak memory of a block of work: device memory on CUDA, resident set size on CPU.

On CUDA the allocator's own peak counter is exact. On CPU there is no such counter for
torch's allocations, so a thread samples the C heap's bytes in use (glibc's
``mallinfo2``, which torch's CPU allocator goes through) every few milliseconds; the
result is the peak above the level when the block started: what the block added (its
caches and activations, not the model already loaded). Resident set size would hide
memory reused from earlier blocks. Elsewhere (no glibc) the peak is None.
"""

from __future__ import annotations

import ctypes
import threading

import torch


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak`` (bytes added at the peak, or None)."""

    def __init__(self, device: torch.device | str, interval: float = 0.002):
        self.device = torch.device(device)
        self.interval = interval
        self.peak: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _heap_in_use()
            self._max = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            if self._base is not None:
                self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._max = max(self._max, _heap_in_use() or 0)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._base is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _heap_in_use() or 0) - self._base


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo2():
    try:
        libc = ctypes.CDLL(None)
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def _heap_in_use() -> int | None:
    """Bytes the C heap has handed out and not yet freed (mmap'd blocks included), or None."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd
