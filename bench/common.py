"""What every benchmark shares: timing, peak memory, and writing the result file."""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stopwatch:
    """Wall-clock seconds of a ``with`` block, read from ``.seconds`` afterwards."""

    seconds: float = 0.0

    @contextmanager
    def time(self) -> Iterator[Stopwatch]:
        start = time.perf_counter()
        try:
            yield self
        finally:
            self.seconds = time.perf_counter() - start


def write_result(name: str, figures: dict) -> Path:
    """Write one benchmark's figures (keys named after what they measure, plus ``params``)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    target = RESULTS_DIR / f"{name}.json"
    target.write_text(json.dumps(figures, indent=2, sort_keys=True, default=str) + "\n")
    print(json.dumps(figures, indent=2, sort_keys=True, default=str))
    return target


def require_same_answers(name: str, checks: dict[str, bool]) -> None:
    """Exit non-zero when the measured side and its baseline disagree on any check.

    Called after the result file is written, so that the figures of a failed run stay readable.
    """
    failed = sorted(check for check, same in checks.items() if not same)
    if failed:
        print(f"{name}: the compared sides disagree on {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)
