"""What a step used, read from the kernel: CPU seconds, peak memory, GPU seconds, bytes written.

A snapshot is taken when a step starts and another when it ends, in the step's own process:

- CPU seconds: user + system time of the process and of the children it reaped during the
  step (dbt runs as a subprocess), from ``getrusage``;
- peak memory: the process's resident high-water mark (``VmHWM``), reset at the step's start
  through ``/proc/self/clear_refs`` so a step in a long-lived process is measured alone; where
  the kernel refuses the reset, the process's lifetime peak (``ru_maxrss``) stands in and the
  usage says so;
- bytes written: the bytes the process passed to ``write`` calls (``wchar`` of
  ``/proc/self/io``); a subprocess's own writes are not in it;
- GPU seconds: the step's wall time when it allocated CUDA memory through PyTorch (the time
  it held the GPU, as clouds bill it); zero when PyTorch never touched CUDA.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Snapshot:
    """Counters at one moment (cumulative since the process started)."""

    wall: float
    cpu_s: float
    children_cpu_s: float
    bytes_written: int
    peak_reset: bool


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


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


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
    )


def stop(begin: Snapshot) -> Usage:
    """What the process used since ``begin``."""
    wall = time.monotonic() - begin.wall
    cuda = _torch_cuda()
    used_gpu = cuda is not None and any(
        cuda.max_memory_allocated(device) > 0 for device in range(cuda.device_count())
    )
    peak, scope = _peak_rss()
    return Usage(
        wall_s=wall,
        cpu_s=(_cpu(resource.RUSAGE_SELF) - begin.cpu_s)
        + (_cpu(resource.RUSAGE_CHILDREN) - begin.children_cpu_s),
        peak_memory_bytes=peak,
        gpu_s=wall if used_gpu else 0.0,
        bytes_written=max(0, _bytes_written() - begin.bytes_written),
        peak_scope=scope if begin.peak_reset else "process",
    )
