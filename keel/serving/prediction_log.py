"""The durable prediction log of ``keel serve``: one JSON line per scored entity.

Every worker appends to its own file, ``predictions-<UTC start>-<pid>-<n>.jsonl`` under
``$KEEL_HOME/artefacts/prediction_log`` (`default_log_dir`). A request's lines go to the
operating system in one ``write`` before its response is sent, so killing the worker
(``kill -9``) loses no line of an acknowledged request: the kernel holds the bytes. A file
rotates when it passes `ROTATE_BYTES` or `ROTATE_SECONDS`; the finished file is fsynced
before the next one starts, so a rotated file also survives a power cut.

A prediction line (``"record": "prediction"``) has these fields:

=================== ==================================================================
request_id          the id returned to the client (one request, many lines)
ts                  UTC time the request arrived, ISO 8601 (``2026-01-05T10:00:00.123456+00:00``)
account_id          the entity (null on the direct-features route without an id)
row                 position of the entity in the request (0, 1, ...)
arm                 ``champion`` or ``canary`` (the deployment arm that answered)
model_version       registry version of the arm's model
score               P(default) the client received (null for an unknown entity)
latency_ms          time from request start to the log write, milliseconds
error               null, or why the arm's model failed (``canary: ValueError: ...``); the
                    client then got the champion's score, named by ``fallback_version``
fallback_version    null, or the champion version whose score was served after an error
cache_hit           whether the score came from the prediction cache
feature_event_time  event time of the features used (UTC ISO), null when not known
features            object: the model's feature values as served
route               ``lookup`` (features from the online store) or ``features`` (given)
shadow_version      null here; see below
shadow_score        null here
shadow_latency_ms   null here (then: shadow model time, the request's share of a batch)
shadow_error        null here
=================== ==================================================================

The shadow model scores off the response path, so its result arrives later as its own
line (``"record": "shadow"``) with ``request_id``, ``ts``, ``account_id``, ``row`` and the four
``shadow_*`` fields. `read_prediction_log` joins it onto its prediction row, so a reader sees
one row per scored entity with every field above.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from keel.settings import KeelPaths

if TYPE_CHECKING:
    import pandas as pd

PREDICTION_LOG_DIRNAME = "prediction_log"
ROTATE_BYTES = 64 * 1024 * 1024
ROTATE_SECONDS = 3600.0
PREDICTION = "prediction"
SHADOW = "shadow"

PREDICTION_FIELDS = (
    "request_id",
    "ts",
    "account_id",
    "row",
    "arm",
    "model_version",
    "score",
    "latency_ms",
    "error",
    "fallback_version",
    "cache_hit",
    "feature_event_time",
    "features",
    "route",
)
SHADOW_FIELDS = ("shadow_version", "shadow_score", "shadow_latency_ms", "shadow_error")
COLUMNS = PREDICTION_FIELDS + SHADOW_FIELDS
_FILE_PREFIX = "predictions-"
_STAMP = "%Y%m%dT%H%M%S"
# The longest a request may take from arrival (its ``ts``) to its log write.
_LATEST_WRITE = timedelta(minutes=10)


def default_log_dir(paths: KeelPaths | None = None) -> Path:
    """``$KEEL_HOME/artefacts/prediction_log``: where ``keel serve`` writes its log."""
    return (paths or KeelPaths.current()).artefacts / PREDICTION_LOG_DIRNAME


class PredictionLogWriter:
    """Appends JSON lines to this process's log file; thread-safe, one write per call.

    Args:
        directory: The log folder (created if missing).
        rotate_bytes: Start a new file once the current one is this large.
        rotate_seconds: Start a new file once the current one is this old.
    """

    def __init__(
        self,
        directory: str | Path,
        rotate_bytes: int = ROTATE_BYTES,
        rotate_seconds: float = ROTATE_SECONDS,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0
        self._sequence = 0
        self._size = 0
        self._opened = 0.0
        self.path: Path | None = None

    def _open(self) -> None:
        # A forked worker must never share its parent's file: each process owns one.
        self._pid = os.getpid()
        self._sequence += 1
        stamp = datetime.now(UTC).strftime(_STAMP)
        self.path = self.directory / f"{_FILE_PREFIX}{stamp}-{self._pid}-{self._sequence}.jsonl"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._size = 0
        self._opened = time.monotonic()

    def _rotate_if_due(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            if self._size < self.rotate_bytes and (
                time.monotonic() - self._opened < self.rotate_seconds
            ):
                return
            os.fsync(self._fd)
            os.close(self._fd)
        self._open()

    def write(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Append ``records`` as JSON lines in one ``write``; returns the bytes written."""
        data = b"".join(
            orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)
            for record in records
        )
        if not data:
            return 0
        with self._lock:
            self._rotate_if_due()
            view = memoryview(data)
            while view:  # a regular file takes it whole; loop in case a signal splits it
                written = os.write(self._fd, view)
                view = view[written:]
            self._size += len(data)
        return len(data)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None and self._pid == os.getpid():
                os.fsync(self._fd)
                os.close(self._fd)
            self._fd = None


def _file_start(path: Path) -> datetime | None:
    try:
        stamp = path.name[len(_FILE_PREFIX) :].split("-", 1)[0]
        return datetime.strptime(stamp, _STAMP).replace(tzinfo=UTC)
    except ValueError:
        return None


def _as_utc(moment: datetime | str | None) -> datetime | None:
    if moment is None:
        return None
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def read_prediction_log(
    directory: str | Path | None = None,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
) -> pd.DataFrame:
    """Every prediction row with ``since <= ts < until``, shadow results joined on.

    One row per scored entity with the columns `COLUMNS` (``ts`` and ``feature_event_time``
    as UTC timestamps, ``features`` as dicts), ordered by ``ts``. A line cut short by a crash
    mid-write (no trailing newline) is skipped: its request was never acknowledged.

    Args:
        directory: The log folder; default `default_log_dir`.
        since: Earliest request time included (naive means UTC).
        until: First request time excluded.
    """
    import pandas as pd

    folder = Path(directory) if directory is not None else default_log_dir()
    start, end = _as_utc(since), _as_utc(until)
    predictions: list[dict[str, Any]] = []
    shadows: dict[tuple[str, int], dict[str, Any]] = {}
    files = sorted(folder.glob(f"{_FILE_PREFIX}*.jsonl")) if folder.is_dir() else []
    for path in files:
        opened = _file_start(path)
        # A file holds lines written from its start until its last write, of requests that
        # arrived a little earlier: files that start well after ``until``, or were last
        # written before ``since``, cannot hold a wanted line.
        if end is not None and opened is not None and opened > end + _LATEST_WRITE:
            continue
        if start is not None and path.stat().st_mtime < start.timestamp():
            continue
        for line in path.read_bytes().split(b"\n")[:-1]:
            if not line:
                continue
            record = orjson.loads(line)
            if record.get("record") == SHADOW:
                shadows[(record["request_id"], record["row"])] = record
            else:
                predictions.append(record)
    frame = pd.DataFrame.from_records(predictions, columns=list(PREDICTION_FIELDS))
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True, format="ISO8601", errors="coerce")
    frame["feature_event_time"] = pd.to_datetime(
        frame["feature_event_time"], utc=True, format="ISO8601"
    )
    if start is not None:
        frame = frame[frame["ts"] >= pd.Timestamp(start)]
    if end is not None:
        frame = frame[frame["ts"] < pd.Timestamp(end)]
    keys = zip(frame["request_id"], frame["row"], strict=True)
    matched = [shadows.get(key, {}) for key in keys]
    for name in SHADOW_FIELDS:
        frame[name] = [record.get(name) for record in matched]
    return frame.sort_values("ts", kind="stable").reset_index(drop=True)
