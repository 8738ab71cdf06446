"""The ``evidently ui`` service on Keel's workspace, started beside the Dagster UI."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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
