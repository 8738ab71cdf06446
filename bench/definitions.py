"""How long the Dagster definitions take to load, with the shipped datasets and with a third.

Each load is a fresh interpreter that imports ``orchestration.definitions`` and resolves the
asset graph and every job, as ``dagster dev`` and each run's process do. The third dataset is
scaffolded by ``keel dataset new`` from a small file of screenings, as the README adds one,
in a copy of the datasets folder; ``keel prepare`` parses dbt first (not timed). The figure is
the median of ``LOADS`` loads (goal: under 5 s with three datasets).
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import require_same_answers, write_result
from keel.settings import DBT_PROJECT_DIR, PROJECT_ROOT

LOADS = 5
THIRD = "screenings"
# One fresh process: import, resolve the graph and the jobs, print the asset and group counts.
LOAD = """
import json, time
start = time.perf_counter()
from orchestration.definitions import defs
graph = defs.resolve_asset_graph()
defs.resolve_all_job_defs()
seconds = time.perf_counter() - start
keys = list(graph.get_all_asset_keys())
print(json.dumps({"seconds": seconds, "assets": len(keys),
                  "groups": sorted({graph.get(key).group_name for key in keys})}))
"""


def write_screenings(path: Path, rows: int = 2_000) -> None:
    draw = random.Random(7)
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["applicant_id", "screened_on", "income", "debt_ratio", "age", "sex", "bad"])
        for number in range(1, rows + 1):
            day = f"2025-{draw.randint(1, 12):02d}-{draw.randint(1, 28):02d}"
            out.writerow(
                [
                    number,
                    day,
                    draw.randint(10_000, 90_000),
                    round(draw.random(), 3),
                    draw.randint(18, 80),
                    draw.choice("FM"),
                    int(draw.random() < 0.2),
                ]
            )


def loads(env: dict[str, str]) -> list[dict]:
    import json

    results = []
    for _ in range(LOADS):
        done = subprocess.run(
            [sys.executable, "-c", LOAD],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def main() -> None:
    keel = str(Path(sys.executable).with_name("keel"))
    with tempfile.TemporaryDirectory(prefix="keel-bench-definitions-") as scratch:
        root = Path(scratch)
        datasets = root / "datasets"
        for folder in sorted((PROJECT_ROOT / "datasets").iterdir()):
            if (folder / "dataset.yaml").exists():
                shutil.copytree(folder, datasets / folder.name)
        write_screenings(root / "screenings.csv")
        env = {
            **os.environ,
            "KEEL_DATASETS_DIR": os.path.relpath(datasets, DBT_PROJECT_DIR),
            "DBT_TARGET_PATH": str(root / "dbt-target"),
            "KEEL_HOME": str(root / "home"),
            "KEEL_PROFILE": "local",
        }
        for command in (
            [keel, "dataset", "new", THIRD, "--from", str(root / "screenings.csv")],
            [keel, "prepare"],
        ):
            subprocess.run(command, cwd=PROJECT_ROOT, env=env, check=True, capture_output=True)
        with_third = loads(env)
        shipped_env = {k: v for k, v in env.items() if k not in ("KEEL_DATASETS_DIR",)}
        shipped_env["DBT_TARGET_PATH"] = str(root / "dbt-target-shipped")
        subprocess.run(
            [keel, "prepare"], cwd=PROJECT_ROOT, env=shipped_env, check=True, capture_output=True
        )
        shipped = loads(shipped_env)
        dataset_count = len(list(datasets.glob("*/dataset.yaml")))
    seconds = statistics.median(r["seconds"] for r in with_third)
    figures = {
        "load_seconds": seconds,
        "load_seconds_shipped": statistics.median(r["seconds"] for r in shipped),
        "assets": with_third[0]["assets"],
        "assets_shipped": shipped[0]["assets"],
        "goals": {"load_under_5_s": seconds < 5.0},
        "params": {
            "loads": LOADS,
            "datasets": dataset_count,
            "load_average_1m": os.getloadavg()[0],
            "cpus": os.cpu_count(),
        },
    }
    write_result("definitions", figures)
    require_same_answers(
        "definitions",
        {
            "the third dataset has its own group": THIRD in with_third[0]["groups"],
            "the third dataset adds assets": with_third[0]["assets"] > shipped[0]["assets"],
            "every load saw the same graph": len({r["assets"] for r in with_third}) == 1,
        },
    )
