"""The ``evidently ui`` service on Keel's workspace, started beside the Dagster UI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_PORT = 8001


def workspace_dir(artefacts_root: Path | str) -> Path:
    """Where the Evidently workspace lives inside the artefact folder."""
    return Path(artefacts_root) / "dashboards" / "evidently"


def evidently_ui_command(workspace: Path | str, host: str, port: int) -> list[str]:
    """The command line of the Evidently UI service (from this environment) on ``workspace``."""
    evidently = Path(sys.executable).with_name("evidently")
    return [
        str(evidently),
        "ui",
        "--workspace",
        str(workspace),
        "--host",
        host,
        "--port",
        str(port),
    ]


def evidently_ui_environment() -> dict[str, str]:
    """The service's environment: nothing may leave the machine, so no usage telemetry."""
    return {**os.environ, "DO_NOT_TRACK": "1"}


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _stop(process: subprocess.Popen, grace_seconds: float = 10.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(grace_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_beside(
    command: list[str],
    cwd: Path,
    workspace: Path,
    *,
    host: str,
    port: int,
    echo: Callable[[str], None] = print,
) -> int:
    """Run ``command`` (the Dagster UI) with the Evidently UI on ``workspace`` beside it.

    Both stop together: when the command ends, on Ctrl-C, or on SIGTERM.
    """
    workspace.mkdir(parents=True, exist_ok=True)
    ui_command = evidently_ui_command(workspace, host, port)
    ui = subprocess.Popen(ui_command, env=evidently_ui_environment())
    echo(f"Evidently UI (monitoring dashboards) on http://{host}:{port}, workspace {workspace}")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    main = None
    try:
        main = subprocess.Popen(command, cwd=cwd)
        return main.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if main is not None:
            _stop(main, grace_seconds=30.0)
        _stop(ui)
