"""What a step used, read from the kernel: CPU seconds, peak memory, GPU seconds, bytes written.

A snapshot is taken when a step starts and another when it ends, in the step's own process.
Subprocesses the step runs (dbt, Feast's CLI, a trainer) count with it:

- CPU seconds: user + system time of the process and of the children it reaped during the
  step, with their own descendants (``getrusage``: ``RUSAGE_SELF`` + ``RUSAGE_CHILDREN``);
- peak memory: the process's resident high-water mark (``VmHWM``), reset at the step's start
  through ``/proc/self/clear_refs`` so a step in a long-lived process is measured alone (where
  the kernel refuses the reset, the process's lifetime peak, ``ru_maxrss``, stands in and the
  usage says so), plus the peak of its subprocesses: the most resident memory its live
  descendants held together (sampled every `CHILD_SAMPLE_SECONDS`), or, for a child too short
  to be sampled, the high-water mark the kernel reports for reaped children when it rose
  during the step;
- bytes written: the bytes passed to ``write`` calls (``wchar`` of ``/proc/self/io``), which
  include those of the children reaped during the step;
- GPU seconds: for each CUDA device the step allocated memory on through PyTorch, the step's
  wall time (the time it held the device, as clouds bill it); zero when PyTorch never touched
  CUDA, so a CPU-only machine records none.

Children still running when the step ends (a daemon it started) are not counted.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

CHILD_SAMPLE_SECONDS = 0.2
# A step whose end never arrives (its run torn down in-process) stops being sampled after this.
CHILD_SAMPLE_LIMIT_SECONDS = 24 * 3600.0


@dataclass(frozen=True)
class Usage:
    """What one step used."""

    wall_s: float
    cpu_s: float
    peak_memory_bytes: int
    gpu_s: float
    bytes_written: int
    peak_scope: str  # "step" (high-water mark reset at its start) or "process"

    def to_json(self) -> dict:
        return asdict(self)


class _ChildSampler:
    """Samples the resident memory of the process's live descendants until stopped."""

    def __init__(self) -> None:
        import psutil

        self.peak = 0
        self._me = psutil.Process()
        try:  # descendants started before the step are not its own
            self._older = {child.pid for child in self._me.children(recursive=True)}
        except psutil.Error:
            self._older = set()
        self._stop = threading.Event()
        self._until = time.monotonic() + CHILD_SAMPLE_LIMIT_SECONDS
        self._thread = threading.Thread(target=self._run, name="keel-cost-children", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while True:
            try:
                children = self._me.children(recursive=True)
            except psutil.Error:
                children = []
            total = 0
            for child in children:
                if child.pid in self._older:
                    continue
                with contextlib.suppress(psutil.Error):  # it ended since the listing
                    total += child.memory_info().rss
            self.peak = max(self.peak, total)
            if self._stop.wait(CHILD_SAMPLE_SECONDS) or time.monotonic() > self._until:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak


@dataclass
class Snapshot:
    """Counters at one moment (cumulative since the process started)."""

    wall: float
    cpu_s: float
    children_cpu_s: float
    bytes_written: int
    peak_reset: bool
    children_maxrss: int = 0
    sampler: _ChildSampler | None = field(default=None, repr=False)


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _children_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def _bytes_written() -> int:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    """Reset the resident high-water mark (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss() -> tuple[int, str]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "step"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process"


def _torch_cuda():
    torch = sys.modules.get("torch")  # never import torch for a step that did not
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


def gpu_seconds(wall_s: float, peak_allocated: Iterable[int]) -> float:
    """GPU seconds of a step: its wall time on each device it allocated memory on.

    ``peak_allocated`` holds each CUDA device's peak allocated bytes during the step (empty
    without CUDA).
    """
    return wall_s * sum(1 for peak in peak_allocated if peak > 0)


def children_peak(sampled: int, maxrss_before: int, maxrss_after: int) -> int:
    """The subprocesses' peak memory: the sampled one, or the reaped children's high-water mark.

    The kernel keeps one high-water mark for every child the process ever reaped, so it tells
    about this step only when it rose during it.
    """
    return max(sampled, maxrss_after if maxrss_after > maxrss_before else 0)


def start() -> Snapshot:
    """The counters at a step's start; resets the peak-memory marks for the step."""
    cuda = _torch_cuda()
    if cuda is not None:
        for device in range(cuda.device_count()):
            cuda.reset_peak_memory_stats(device)
    return Snapshot(
        wall=time.monotonic(),
        cpu_s=_cpu(resource.RUSAGE_SELF),
        children_cpu_s=_cpu(resource.RUSAGE_CHILDREN),
        bytes_written=_bytes_written(),
        peak_reset=_reset_peak(),
        children_maxrss=_children_maxrss(),
        sampler=_ChildSampler() if os.name == "posix" else None,
    )


def stop(begin: Snapshot) -> Usage:
    """What the process and its reaped children used since ``begin``."""
    wall = time.monotonic() - begin.wall
    sampled = begin.sampler.stop() if begin.sampler is not None else 0
    cuda = _torch_cuda()
    peaks = (
        [cuda.max_memory_allocated(device) for device in range(cuda.device_count())]
        if cuda is not None
        else []
    )
    peak, scope = _peak_rss()
    return Usage(
        wall_s=wall,
        cpu_s=(_cpu(resource.RUSAGE_SELF) - begin.cpu_s)
        + (_cpu(resource.RUSAGE_CHILDREN) - begin.children_cpu_s),
        peak_memory_bytes=peak + children_peak(sampled, begin.children_maxrss, _children_maxrss()),
        gpu_s=gpu_seconds(wall, peaks),
        bytes_written=max(0, _bytes_written() - begin.bytes_written),
        peak_scope=scope if begin.peak_reset else "process",
    )
