"""The prediction log read incrementally, for the canary's judge.

The release watcher judges the canary every few seconds on every row logged since the canary
started. Reading the whole log each time costs more the longer the canary runs (at 2,000
requests/s, seconds of CPU per check after a minute, on the cores that serve).
`PredictionLogTail` reads each byte once: it remembers how far it got in every file, parses
only the complete lines added since, and keeps only the columns the guardrails use
(`GUARDRAIL_COLUMNS`). Rows that have left the judged window are dropped from memory, and the
canary rows among them are counted, so a long canary holds no more than its window.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from keel.serving.prediction_log import _FILE_PREFIX, _as_utc

if TYPE_CHECKING:
    import pandas as pd

GUARDRAIL_COLUMNS = (
    "ts",
    "account_id",
    "arm",
    "model_version",
    "score",
    "latency_ms",
    "error",
    "cache_hit",
)
# Shadow lines carry nothing the guardrails judge; the writer puts ``record`` first.
_SHADOW_LINE = b'{"record":"shadow"'
# The served features follow every field the guardrails read; a line is parsed up to them.
# A JSON string cannot hold this byte sequence (its quote would be escaped), so the first
# occurrence is the key.
_FEATURES_KEY = b',"features":'


def _guardrail_record(line: bytes) -> dict[str, Any] | None:
    if line.startswith(_SHADOW_LINE) or not line:
        return None
    cut = line.find(_FEATURES_KEY)
    if cut > 0:
        try:
            return orjson.loads(line[:cut] + b"}")
        except orjson.JSONDecodeError:
            pass  # not a line of our writer's shape: parse it whole
    return orjson.loads(line)


class PredictionLogTail:
    """The prediction rows of a log folder since a start time, read a little at a time.

    One tail follows one (folder, start) pair; asked for another, it starts over.
    """

    def __init__(self) -> None:
        self._start(None, None)

    def _start(self, directory: Path | None, since: datetime | None) -> None:
        self.directory, self.since = directory, since
        self.lines_parsed = 0  # prediction lines parsed since the start (each once)
        self._offsets: dict[Path, int] = {}
        self._chunks: list[pd.DataFrame] = []
        self._dropped: dict[tuple[str, str], int] = {}
        self._strings: dict[str, str] = {}

    def _follow(self, directory: str | Path, since: datetime | str | None) -> None:
        directory, since = Path(directory), _as_utc(since)
        if directory != self.directory or since != self.since:
            self._start(directory, since)

    def dropped_rows(self, arm: str, version: str) -> int:
        """Rows of ``arm`` and ``version`` since the start that left the kept window."""
        return self._dropped.get((arm, str(version)), 0)

    def _new_lines(self) -> Iterator[bytes]:
        if not self.directory.is_dir():
            return
        present = set()
        for path in sorted(self.directory.glob(f"{_FILE_PREFIX}*.jsonl")):
            present.add(path)
            offset = self._offsets.get(path)
            if offset is None:
                stat = path.stat()
                # Last written before the start: nothing in it is wanted, only what comes later.
                if self.since is not None and stat.st_mtime < self.since.timestamp():
                    self._offsets[path] = stat.st_size
                    continue
                offset = 0
            with path.open("rb") as handle:
                handle.seek(offset)
                data = handle.read()
            end = data.rfind(b"\n")
            if end < 0:
                continue  # a line still being written (or cut short by a crash)
            self._offsets[path] = offset + end + 1
            yield from data[:end].split(b"\n")
        for gone in set(self._offsets) - present:
            del self._offsets[gone]

    def _read_new(self) -> None:
        import pandas as pd

        intern = self._strings
        rows = []
        for line in self._new_lines():
            record = _guardrail_record(line)
            if record is None:
                continue
            arm, version = record.get("arm"), record.get("model_version")
            rows.append(
                (
                    record.get("ts"),
                    record.get("account_id"),
                    intern.setdefault(arm, arm) if arm is not None else None,
                    intern.setdefault(version, version) if version is not None else None,
                    record.get("score"),
                    record.get("latency_ms"),
                    record.get("error"),
                    bool(record.get("cache_hit")),
                )
            )
        self.lines_parsed += len(rows)
        if not rows:
            return
        chunk = pd.DataFrame.from_records(rows, columns=list(GUARDRAIL_COLUMNS))
        chunk["ts"] = pd.to_datetime(chunk["ts"], utc=True, format="ISO8601", errors="coerce")
        if self.since is not None:
            chunk = chunk[chunk["ts"] >= pd.Timestamp(self.since)]
        if not chunk.empty:
            self._chunks.append(chunk.reset_index(drop=True))

    def _keep_from(self, moment: datetime) -> None:
        """Drop rows read earlier whose requests all arrived before ``moment``, counting them."""
        import pandas as pd

        cutoff = pd.Timestamp(_as_utc(moment))
        kept = []
        for chunk in self._chunks:
            if chunk["ts"].max() >= cutoff:  # a chunk is kept whole while any row is wanted
                kept.append(chunk)
                continue
            counts = chunk.groupby(["arm", "model_version"], dropna=True).size()
            for (arm, version), count in counts.items():
                key = (arm, str(version))
                self._dropped[key] = self._dropped.get(key, 0) + int(count)
        self._chunks = kept

    def read(
        self,
        directory: str | Path,
        since: datetime | str | None,
        keep_from: datetime | None = None,
    ) -> pd.DataFrame:
        """Every row since ``since`` not yet dropped, as `GUARDRAIL_COLUMNS`.

        Args:
            directory: The prediction log folder every serving worker writes.
            since: The first request time wanted (the canary's start); naive means UTC.
            keep_from: Drop rows read earlier whose requests all arrived before this moment
                (the judged window's start); `dropped_rows` counts them.
        """
        import pandas as pd

        self._follow(directory, since)
        if keep_from is not None:
            self._keep_from(keep_from)
        self._read_new()
        if not self._chunks:
            frame = pd.DataFrame(columns=list(GUARDRAIL_COLUMNS))
            frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
            return frame
        # Chunks stay apart, one per read, so that old ones can be dropped whole.
        return pd.concat(self._chunks, ignore_index=True)
