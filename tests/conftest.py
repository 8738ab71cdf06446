"""Shared fixtures: every test gets its own data folder, so nothing touches the user's .keel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keel.settings import KeelPaths

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test leaves the process environment as it found it.

    Commands run in process (CliRunner) set defaults in ``os.environ`` as entry points do, e.g.
    the team profile's service URLs; without this a later test would inherit them.
    """
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)


@pytest.fixture
def keel_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KeelPaths:
    """A fresh, empty data folder set as KEEL_HOME for the test."""
    home = tmp_path / "keel-home"
    monkeypatch.setenv("KEEL_HOME", str(home))
    monkeypatch.setenv("KEEL_PROFILE", "local")
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    return KeelPaths(home).ensure()


@pytest.fixture(scope="session")
def venv_bin() -> Path:
    return Path(os.environ.get("VIRTUAL_ENV", REPO_ROOT / ".venv")) / "bin"


@pytest.fixture
def small_sources(keel_home: KeelPaths):
    """A small generated world (300 accounts) with late rows, in the test's data folder."""
    from orchestration.resources import SourcesResource

    return SourcesResource(
        generated_dir=str(keel_home.generated),
        landing_dir=str(keel_home.landing),
        accounts=300,
        late_share=0.02,
    )


@pytest.fixture
def data_resources(keel_home: KeelPaths, small_sources):
    """The local profile's resources on the test's data folder, with the small generator."""
    from orchestration.profiles import resources_for

    return {**resources_for("local"), "sources": small_sources}
