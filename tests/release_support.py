"""Shared pieces of the release tests: a private copy of the serving world's registry,
prediction-log rows, a local alert webhook, and the Dagster resources on a test folder.
"""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest

from keel.registry import ModelRegistry, RegistryConfig
from keel.serving.guardrails import GuardrailPolicy
from keel.settings import KeelPaths
from tests.serving_support import World

# Small bars so that a test judges after a few hundred log rows.
FAST_POLICY = GuardrailPolicy(
    window_minutes=10,
    min_requests=100,
    min_latency_rows=100,
    promote_after_requests=300,
    promote_after_minutes=0,
)


@pytest.fixture
def world(request: pytest.FixtureRequest) -> World:
    """The session's serving world (registered champion and challenger); aliases never move."""
    return request.getfixturevalue("serving_world")


@pytest.fixture
def registry_copy(world: World, tmp_path: Path) -> RegistryConfig:
    """A private copy of the world's registry database (the model artefacts stay shared)."""
    home = KeelPaths(tmp_path / "release-home").ensure()
    for path in world.home.mlflow.iterdir():  # the database and the audit key
        if path.is_file() and not path.name.endswith(".lock"):
            shutil.copy2(path, home.mlflow / path.name)
    return RegistryConfig.local(home)


@pytest.fixture
def registry(registry_copy: RegistryConfig):
    opened = ModelRegistry(registry_copy)
    yield opened
    opened.close()


def log_rows(
    arm: str,
    version: str,
    count: int,
    *,
    start: datetime,
    error_share: float = 0.0,
    latency_ms: float = 4.0,
    seed: int = 0,
) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for n in range(count):
        failed = n < round(count * error_share)
        rows.append(
            {
                "record": "prediction",
                "request_id": uuid.uuid4().hex,
                "ts": (start + timedelta(milliseconds=10 * n)).isoformat(),
                "account_id": int(rng.integers(1, 10_000)),
                "row": 0,
                "arm": arm,
                "model_version": version,
                "score": float(rng.beta(2, 8)),
                "latency_ms": float(latency_ms * rng.uniform(0.8, 1.2)),
                "error": f"{arm}: RuntimeError: boom" if failed else None,
                "fallback_version": "1" if failed else None,
                "cache_hit": False,
                "feature_event_time": None,
                "features": {},
                "route": "lookup",
            }
        )
    return rows


def log_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
    return frame


class _Webhook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        return None


@pytest.fixture
def webhook():
    server = HTTPServer(("127.0.0.1", 0), _Webhook)
    _Webhook.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/alert", _Webhook.received
    server.shutdown()
    server.server_close()


def dagster_resources(config: RegistryConfig, root: Path, webhook_url: str = "") -> dict:
    from orchestration.resources import (
        ArtefactStore,
        FeatureStoreResource,
        MlflowResource,
        ModelGovernance,
        MonitoringResource,
    )

    return {
        "mlflow": MlflowResource(
            tracking_uri=config.tracking_uri,
            registry_uri=config.registry_uri,
            artifact_location=str(root / "mlruns"),
            lock_file=config.lock_file,
        ),
        "governance": ModelGovernance(auto_approve=True),
        "artefacts": ArtefactStore(root=str(root / "artefacts")),
        "monitoring": MonitoringResource(webhook_url=webhook_url),
        "feature_store": FeatureStoreResource(
            repo_path=str(root), config_file="feature_store.yaml", marts=str(root / "marts")
        ),
    }
