"""Browser tests: `keel dev` (what `make dev` runs) in a fresh data folder, driven by chromium.

Playwright drives Debian's chromium package (`make browser` installs it); nothing is downloaded.
Every request a page makes outside 127.0.0.1 is refused and the test fails on it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from keel.settings import KeelPaths
from tests.conftest import REPO_ROOT
from tests.dashboards_support import daily_results, report_drift, report_performance

CHROMIUM = Path("/usr/bin/chromium")
DATASET = "browser"
DAYS = [f"2026-04-{n:02d}" for n in range(1, 7)]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="no /usr/bin/chromium: run `make browser` first"
    ),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"keel dev exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(2)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _wait_for(condition, timeout: float, what: str, step: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(step)
    pytest.fail(f"{what}: not within {timeout:.0f} s")


@dataclass
class Dev:
    home: KeelPaths
    dagster: str
    evidently: str
    log: Path


@pytest.fixture(scope="module")
def keel_dev(tmp_path_factory):
    """`keel dev` on free ports with its own KEEL_HOME (and so its own DAGSTER_HOME)."""
    home = KeelPaths(tmp_path_factory.mktemp("browser") / "keel-home").ensure()
    log = home.home / "keel-dev.log"
    dagster_port, evidently_port = _free_port(), _free_port()
    env = {**os.environ, "KEEL_HOME": str(home.home), "KEEL_PROFILE": "local"}
    env.pop("DAGSTER_HOME", None)
    command = [
        str(REPO_ROOT / ".venv" / "bin" / "keel"),
        "dev",
        "--port",
        str(dagster_port),
        "--dashboards-port",
        str(evidently_port),
    ]
    with log.open("wb") as out:
        # A session of its own: the teardown stops keel dev and everything it started.
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    dev = Dev(home, f"http://127.0.0.1:{dagster_port}", f"http://127.0.0.1:{evidently_port}", log)
    try:
        _wait_http(f"{dev.evidently}/api/version", process, log, timeout=180)
        _wait_http(f"{dev.dagster}/server_info", process, log, timeout=300)
        yield dev
    finally:
        os.killpg(process.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(60)
        # Whatever of the session is left (a run worker, a code server) goes with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A page that refuses (and records) every request leaving the machine."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    outside, errors = [], []

    def route(request_route):
        url = request_route.request.url
        if re.match(r"^(https?|wss?)://(127\.0\.0\.1|localhost)[:/]", url) or url.startswith(
            ("data:", "blob:")
        ):
            request_route.continue_()
        else:
            outside.append(url)
            request_route.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not outside, f"requests outside the machine: {outside}"
    assert not errors, f"uncaught errors in the page: {errors}"


def test_evidently_dashboards_show_panels_with_data(keel_dev, page, monkeypatch):
    from evidently.ui.workspace import Workspace

    from keel.dashboards import drift_figures, performance_figures, workspace_dir
    from keel.dashboards.workspace import FEATURE_PANEL, PANELS, visible_panels

    drift, perf = daily_results(DAYS, seed=11)
    monkeypatch.setenv("DAGSTER_HOME", str(keel_dev.home.dagster_home))
    with dg.DagsterInstance.get() as instance:
        for n, day in enumerate(DAYS):
            issues = [f"column {i}: values outside the reference range" for i in range(n % 3)]
            report_drift(instance, [DATASET, "drift_report"], day, drift[day], issues)
            report_performance(instance, [DATASET, "performance_report"], day, perf[day])

    # The daemon's monitoring_dashboards sensor feeds the workspace the UI serves.
    workspace = workspace_dir(keel_dev.home.artefacts)

    def fed():
        projects = Workspace(str(workspace)).search_project(DATASET)
        if projects and len(Workspace(str(workspace)).list_runs(projects[0].id)) == 2 * len(DAYS):
            return projects[0]
        return None

    project = _wait_for(fed, 180, "the sensor feeding the workspace")

    page.goto(keel_dev.evidently)
    page.get_by_text(DATASET, exact=True).first.click()
    page.wait_for_url(re.compile(f"/projects/{project.id}"))
    page.get_by_text(FEATURE_PANEL, exact=True).wait_for()
    page.screenshot(path=str(keel_dev.home.home / "evidently-dashboard.png"), full_page=True)

    # Every panel draws its series day by day: a line per series through every day, a bar per
    # series and day, or a counter with the figure.
    figures = {
        *drift_figures({"drift": drift[DAYS[0]].to_dict(), "prediction_drift": False}),
        "quality_issues",
        *performance_figures({"performance": perf[DAYS[0]].to_dict()}),
    }
    panels = visible_panels(figures)
    assert {p.title for p in PANELS} - {p.title for p in panels} == {
        "Largest population stability index of a feature",  # only dataset folders' loads
        *(p.title for p in PANELS if p.tab in ("Scores", "Questions")),  # folders' scores, RAG
    }
    assert FEATURE_PANEL in {p.title for p in panels}
    for panel in panels:
        card = _card(page, panel.title)
        series = len(panel.figures)
        if panel.plot == "line":
            lines = card.locator("path.MuiLineElement-root")
            lines.first.wait_for(state="attached")
            drawn = [path.get_attribute("d") for path in lines.all()]
            through_every_day = [d for d in drawn if d.count("C") == len(DAYS) - 1]
            assert len(through_every_day) >= series, (panel.title, drawn)
            for _, legend in panel.figures:
                assert card.get_by_text(legend, exact=True).count(), (panel.title, legend)
        elif panel.plot == "bar":
            card.locator("[class*=MuiBarElement]").first.wait_for(state="attached")
            bars = card.locator("[class*=MuiBarElement]").count()
            assert bars == series * len(DAYS), (panel.title, bars)
        else:
            assert panel.plot == "counter"
            card.locator("h2").first.wait_for(state="attached")
    expected_share = drift[DAYS[-1]].share_of_drifted_features
    latest = _card(page, "Share of drifted features, latest day").locator("h2").inner_text()
    assert float(latest) == pytest.approx(expected_share, abs=0.01)
    drifted_days = _card(page, "Days with dataset drift").locator("h2").inner_text()
    assert int(float(drifted_days)) == sum(drift[day].dataset_drift for day in DAYS)

    # Reports: the last day's drift snapshot shows each of its figures.
    snapshots = Workspace(str(workspace))

    def last_drift_day(run) -> bool:
        metadata = snapshots.get_run(project.id, run).metadata
        return metadata["report"] == "drift" and metadata["day"] == DAYS[-1]

    last = next(run for run in snapshots.list_runs(project.id) if last_drift_day(run))
    page.goto(f"{keel_dev.evidently}/projects/{project.id}/reports/{last}")
    page.get_by_text("share_of_drifted_features", exact=True).first.wait_for()
    text = page.inner_text("body")
    for figure in drift_figures({"drift": drift[DAYS[-1]].to_dict()}):
        assert f"\n{figure}\n" in text, figure
    shown = re.search(r"\nshare_of_drifted_features\n+([-\d.e]+)\n", text)
    assert shown, text[:2000]
    assert float(shown.group(1)) == pytest.approx(expected_share, abs=1e-3)


def _card(page, title: str):
    """The card that holds the panel titled ``title``."""
    heading = page.get_by_text(title, exact=True).first
    return heading.locator("xpath=ancestor::div[contains(@class, 'MuiCard-root')][1]")


def test_dagster_ui_loads_the_code_location_draws_the_graph_and_backfills_two_days(
    keel_dev, page, monkeypatch
):
    from assets.partitions import DAILY_PARTITIONS

    # A fresh Dagster UI opens a newsletter dialog, at any moment: skip it whenever it shows.
    page.add_locator_handler(
        page.get_by_text("Join the Dagster community"),
        lambda: page.get_by_role("button", name="Skip").click(),
    )
    page.goto(f"{keel_dev.dagster}/deployment/locations")
    page.get_by_text("1 code location", exact=True).wait_for()
    page.get_by_text("orchestration.definitions").first.wait_for()
    page.get_by_text("Loaded", exact=True).first.wait_for()
    listing = page.locator("body").inner_text()
    assert not re.search(r"error|failed", listing, re.IGNORECASE), listing

    # The asset graph: the ingestion group's nodes, with edges to their dbt models.
    page.goto(f"{keel_dev.dagster}/locations/keel/asset-groups/ingestion")
    for asset in ("raw_account_holders", "raw_account_activity", "raw_default_labels"):
        page.get_by_text(asset, exact=True).first.wait_for()
    assert page.get_by_text("stg_generator__account_holders").count()
    assert page.locator("svg path").count() > 0
    page.screenshot(path=str(keel_dev.home.home / "dagster-asset-graph.png"))

    # A two-day backfill of the generator's daily extract, launched from the asset's page.
    days = DAILY_PARTITIONS.get_partition_keys()[-2:]
    page.goto(f"{keel_dev.dagster}/assets/raw_account_activity")
    page.get_by_role("button", name="Materialize…").first.click()
    selection = page.get_by_placeholder("No matching partitions")
    selection.fill(f"[{days[0]}...{days[1]}]")
    selection.press("Enter")
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("2 partitions", exact=True).wait_for()
    dialog.get_by_role("button", name="Launch backfill").click()
    toast = page.get_by_text(re.compile(r"Created backfill \w+")).first
    toast.wait_for()
    backfill_id = re.search(r"Created backfill (\w+)", toast.inner_text()).group(1)

    page.goto(f"{keel_dev.dagster}/runs/b/{backfill_id}")

    def finished():
        # The backfill page polls the server; its Status field leaves "In progress" at the end.
        found = re.search(r"\nStatus\n([^\n]+)\n", page.locator("body").inner_text())
        return found and found.group(1) not in ("In progress", "Requested") and found.group(1)

    status = _wait_for(finished, 900, f"backfill {backfill_id} to finish", step=10)
    page.screenshot(path=str(keel_dev.home.home / "dagster-backfill.png"))
    assert status == "Succeeded", (status, keel_dev.log.read_text()[-3000:])
    assert page.get_by_text("100% completed").count()

    monkeypatch.setenv("DAGSTER_HOME", str(keel_dev.home.dagster_home))
    with dg.DagsterInstance.get() as instance:
        done = instance.get_materialized_partitions(dg.AssetKey("raw_account_activity"))
    assert set(days) <= done, done
