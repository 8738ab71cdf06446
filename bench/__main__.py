"""Run one benchmark (``python -m bench NAME``) or all of them (``python -m bench all``)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(
        path.stem
        for path in BENCH_DIR.glob("*.py")
        if path.stem not in {"__init__", "__main__", "common"}
    )


def main(argv: list[str]) -> int:
    names = available()
    if len(argv) != 1 or argv[0] not in [*names, "all"]:
        print(f"usage: python -m bench {{all,{','.join(names)}}}", file=sys.stderr)
        return 2
    if argv[0] == "all":
        # Each benchmark in its own process, so that peak memory figures stay separate.
        failed = [n for n in names if subprocess.call([sys.executable, "-m", "bench", n]) != 0]
        if failed:
            print(f"failed benchmarks: {', '.join(failed)}", file=sys.stderr)
        return 1 if failed else 0
    importlib.import_module(f"bench.{argv[0]}").main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
