"""A lake load killed with kill -9 while it writes its Parquet, for the lake's tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from orchestration.resources import WarehouseResource

REPO = Path(__file__).resolve().parent.parent

LOADER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    from keel.ingestion import ACCOUNT_ACTIVITY, load_partition
    from orchestration.resources import WarehouseResource

    settings = json.loads(sys.argv[1])
    warehouse = WarehouseResource(**settings["warehouse"])
    with warehouse.connect() as connection:
        print("loading", flush=True)
        load_partition(connection, ACCOUNT_ACTIVITY, settings["day"], Path(settings["source"]))
    print("loaded", flush=True)
    """
)


def big_activity_csv(path: Path, day: str, rows: int = 3_000_000) -> Path:
    """A day of account activity big enough that its load is still writing when killed."""
    import duckdb

    duckdb.sql(
        f"""copy (select i::varchar as account_id, '{day}' as activity_date,
                         (i % 997)::varchar || '.25' as spend_amount, 'online' as channel
                  from range({rows}) t(i)) to '{path}' (header)"""
    )
    return path


def kill_a_load_once_it_writes(
    warehouse: WarehouseResource,
    day: str,
    source: Path,
    stored: Callable[[], set[Path]],
    timeout_s: float = 120,
) -> set[Path]:
    """Load ``source`` as ``day`` in another process, kill -9 it as soon as ``stored`` shows a
    new file, and return the files it left."""
    existing = stored()
    settings = {"warehouse": warehouse.model_dump(), "day": day, "source": str(source)}
    loader = subprocess.Popen(
        [sys.executable, "-c", LOADER, json.dumps(settings)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert loader.stdout.readline().strip() == "loading"
        deadline = time.monotonic() + timeout_s
        while not stored() - existing:
            assert loader.poll() is None, "the load ended before it wrote a file"
            assert time.monotonic() < deadline, f"the load wrote no file in {timeout_s:g} s"
            time.sleep(0.01)
    finally:
        loader.kill()
        loader.wait(timeout=30)
    assert loader.returncode == -9
    return stored() - existing
