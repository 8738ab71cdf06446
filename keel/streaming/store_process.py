"""The consumer's store stage in a process of its own.

The log stage (events into the log, windows recomputed) and the store stage (windows into
Feast's online store and the offline Parquet files, one value read back) are both mostly
Python; in threads of one process they take turns on one interpreter lock. Here the store
stage runs in a child process with its own interpreter, so the two stages use two cores.

The consumer sends the child each group of logged batches' windows through a pipe and waits
for its answer before it acknowledges them: a batch is acknowledged only once it is in the
stores, as before. The child dies with the consumer (Linux's parent-death signal, and the
pipe's end-of-file on every platform): a consumer killed with ``kill -9`` leaves no writer
behind, and the next one starts its own.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from feast import FeatureStore

# Seconds the child may take to import Feast and open the stores, and to stop when asked.
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1


class StoreStageError(RuntimeError):
    """The store process failed; its traceback is in the message."""


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when the consumer dies (Linux); else the pipe tells."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the consumer died before the signal was set up
        os._exit(1)


def write_groups(writer, groups: list[tuple[int, int, list[tuple]]]) -> tuple[float, bool] | None:
    """Write ``(first_seq, last_seq, windows)`` groups as one write; read one value back.

    An account touched by more than one group is written once, with the window of the latest
    (computed from a log that held all of them). Returns (when servable, read back differed),
    or None when there was nothing to write.
    """
    from keel import schema
    from keel.streaming.features import FEATURES

    if len(groups) == 1:
        windows = groups[0][2]
    else:
        latest = {row[0]: row for _, _, rows in groups for row in rows}
        windows = [latest[account] for account in sorted(latest)]
    if not windows:
        return None
    first_seq = min(group[0] for group in groups)
    last_seq = max(group[1] for group in groups)
    table = writer.write(windows, first_seq, last_seq)
    # Servable means readable through the online store, so read one value back.
    expected = table.slice(table.num_rows - 1).to_pylist()[0]
    got = writer.read_back(expected[schema.ENTITY_KEY])
    mismatch = any(got[name] != expected[name] for name in FEATURES)
    return time.time(), mismatch


def _serve(connection, config, repo_path: str, offline_dir: str, parent_pid: int) -> None:
    """The child: open the stores, then write what arrives until told to stop or orphaned."""
    _die_with_parent(parent_pid)
    try:
        from feast import FeatureStore

        from keel.streaming.writer import FeatureWriter

        writer = FeatureWriter(FeatureStore(repo_path=repo_path, config=config), Path(offline_dir))
    except BaseException:
        connection.send(("error", traceback.format_exc()))
        return
    connection.send(("ready", None))
    while True:
        try:
            groups = connection.recv()
        except (EOFError, OSError):  # the consumer is gone
            return
        if groups is None:
            return
        try:
            connection.send(("ok", write_groups(writer, groups)))
        except BaseException:
            connection.send(("error", traceback.format_exc()))


class StoreProcess:
    """The consumer's handle on its store process; one request at a time."""

    def __init__(self, store: FeatureStore, offline_dir: Path):
        # Spawned, not forked: the consumer holds threads, an event loop and SQLite handles.
        context = multiprocessing.get_context("spawn")
        self.connection, child_end = context.Pipe()
        self.process = context.Process(
            target=_serve,
            args=(child_end, store.config, str(store.repo_path), str(offline_dir), os.getpid()),
            name="keel-stream-store",
            daemon=True,
        )
        self.process.start()
        child_end.close()
        self.ready = False

    def wait_ready(self) -> None:
        """Block until the child has opened the stores (seconds: Feast's imports)."""
        if self.ready:
            return
        if not self.connection.poll(START_TIMEOUT_S):
            raise StoreStageError(f"the store process did not start in {START_TIMEOUT_S:.0f} s")
        self._answer()
        self.ready = True

    def write(self, groups: list[tuple[int, int, list[tuple]]]) -> tuple[float, bool] | None:
        """``write_groups`` in the child; returns when the rows are in the stores."""
        self.wait_ready()
        self.connection.send(groups)
        return self._answer()

    def _answer(self):
        try:
            kind, value = self.connection.recv()
        except (EOFError, OSError):
            self.process.join(1.0)
            raise StoreStageError(
                f"the store process ended (exit code {self.process.exitcode})"
            ) from None
        if kind == "error":
            raise StoreStageError(f"the store process failed:\n{value}")
        return value

    def close(self) -> None:
        """Ask the child to stop; kill it if it does not."""
        with contextlib.suppress(OSError, ValueError):
            self.connection.send(None)
        self.process.join(STOP_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()
