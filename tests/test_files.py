"""Atomic file writes: concurrent writers of one file never collide or leave half a file."""

import threading
from pathlib import Path

import numpy as np
import pandas as pd
from upath import UPath

from keel.files import atomic_write, create_exclusive, replace_durably
from keel.inference import write_predictions


def test_two_concurrent_writers_of_one_file_leave_one_whole_file(tmp_path: Path):
    target = UPath(tmp_path / "predictions" / "2026-02-01.parquet")
    frames = {
        name: pd.DataFrame({"account_id": np.arange(50_000), "score": np.full(50_000, value)})
        for name, value in (("a", 0.25), ("b", 0.75))
    }
    errors: list[BaseException] = []
    seen: set[float] = set()
    stop = threading.Event()

    def write(name: str) -> None:
        try:
            for _ in range(15):
                write_predictions(frames[name], target)
        except BaseException as error:
            errors.append(error)

    def read() -> None:
        while not stop.is_set():
            if target.exists():
                try:
                    scores = pd.read_parquet(target.path)["score"]
                except BaseException as error:
                    errors.append(error)
                    return
                seen.add(float(scores.iloc[0]) if len(scores) == 50_000 else -1.0)

    writers = [threading.Thread(target=write, args=(name,)) for name in frames]
    reader = threading.Thread(target=read)
    reader.start()
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=60)
    stop.set()
    reader.join(timeout=60)
    assert errors == []
    assert seen <= {0.25, 0.75}
    final = pd.read_parquet(target.path)
    assert any(final.equals(frame) for frame in frames.values())
    assert sorted(p.name for p in target.parent.iterdir()) == ["2026-02-01.parquet"]


def test_atomic_write_keeps_the_mode_and_create_exclusive_never_overwrites(tmp_path: Path):
    secret = tmp_path / "key"
    assert create_exclusive(secret, "first", mode=0o600) is True
    assert create_exclusive(secret, "second", mode=0o600) is False
    assert secret.read_text() == "first" and secret.stat().st_mode & 0o777 == 0o600
    atomic_write(tmp_path / "report.json", "{}")
    assert (tmp_path / "report.json").read_text() == "{}"
    (tmp_path / ".mart.parquet.tmp").write_bytes(b"new")
    replace_durably(tmp_path / ".mart.parquet.tmp", tmp_path / "report.json")
    assert (tmp_path / "report.json").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key", "report.json"]
