"""The release part of ``keel demo``: the service up for a moment, two canaries, one switch.

After the closed loop has left at least two approved versions in the registry, the demo serves
the champion with the real app (one uvicorn worker on a free 127.0.0.1 port, features from the
demo's online store), and the release watcher of ``keel serve`` judges two canaries of the
previous champion on live traffic:

1. a broken canary: the demo injects a fault into the canary's model (every fifth call
   raises), clients still get the champion's score, and the guardrails roll it back;
2. the same version without the fault: it holds its guardrails and is promoted.

A blue-green switch then gives the champion alias back to the version the loop left, and the
audit trail of the release is printed. Traffic is bounded (a few thousand requests, a minute).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from keel.serving.guardrails import GuardrailPolicy

# Short windows and low counts, so the demo decides in seconds; the policy is printed. The
# score guardrail compares the canary's live scores with its own held-out ones (default bar).
DEMO_POLICY = GuardrailPolicy(
    window_minutes=5,
    min_requests=80,
    promote_after_requests=150,
    promote_after_minutes=0,
)
DEMO_ACTOR = "keel-demo"
MAX_REQUESTS = 6_000
MAX_SECONDS = 90.0


class InjectedFault:
    """The demo's broken canary: the real model, but every fifth call raises."""

    def __init__(self, model: Any) -> None:
        self.model, self.family, self.calls = model, model.family, 0
        self._lock = threading.Lock()

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.model.feature_names

    def predict_proba(self, frame):
        with self._lock:
            self.calls += 1
            calls = self.calls
        if calls > 2 and calls % 5 == 0:  # the two warm-up calls pass
            raise RuntimeError("fault injected by keel demo")
        return self.model.predict_proba(frame)


def _accounts(paths) -> list[int]:
    import pyarrow.parquet as pq

    from keel import schema

    files = sorted((paths.marts / schema.FEATURES_MART).glob("*.parquet"))
    table = pq.read_table(files[-1], columns=[schema.ENTITY_KEY])
    return sorted({int(v) for v in table.column(schema.ENTITY_KEY).to_pylist()})[:2_000]


def _traffic(url: str, accounts: list[int], until: Callable[[], bool]) -> tuple[int, int]:
    """One-account requests from two threads until ``until()``; (answered, failed)."""
    import httpx

    counts = [0, 0]
    lock = threading.Lock()
    deadline = time.monotonic() + MAX_SECONDS

    def client(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for n in range(MAX_REQUESTS // 2):
                if until() or time.monotonic() > deadline:
                    return
                account = accounts[(offset + 7 * n) % len(accounts)]
                try:
                    ok = http.post("/v1/predict", json={"account_ids": [account]}).is_success
                except httpx.HTTPError:
                    ok = False
                with lock:
                    counts[0 if ok else 1] += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counts[0], counts[1]


def _wait(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


def _canary_gone(registry) -> Callable[[], bool]:
    """Whether the registry has no canary any more, read at most twice a second."""
    from keel.serving.release import release_state

    state = {"at": 0.0, "gone": False}
    lock = threading.Lock()

    def gone() -> bool:
        with lock:
            if time.monotonic() - state["at"] > 0.5:
                state["gone"] = release_state(registry).canary is None
                state["at"] = time.monotonic()
            return state["gone"]

    return gone


def run_release_demo(paths, echo: Callable[[str], None] = print) -> list[Any]:
    """Serve, roll back a broken canary, promote a good one, switch back; the audit records."""
    import uvicorn

    from keel.registry import APPROVED, ModelRegistry, RegistryConfig
    from keel.serving import release
    from keel.serving.app import create_app
    from keel.serving.deployments import Deployments, load_registered_model
    from keel.serving.settings import ServeSettings

    config = RegistryConfig.local(paths)
    with ModelRegistry(config) as registry:
        champion = registry.champion()
        previous = [
            r.from_version
            for r in reversed(registry.audit_records())
            if r.action == "promote" and r.from_version and r.from_version != champion
        ]
        candidate = next(
            (v for v in previous if registry.info(v).approval_status == APPROVED), None
        )
        first_record = registry.audit_records(limit=1)[-1].id
    if champion is None or candidate is None:
        echo("release demo skipped: it needs a champion and an earlier approved version")
        return []

    faulty: set[str] = {candidate}

    def load(version: str) -> Any:
        model = load_registered_model(config, version)
        return InjectedFault(model) if version in faulty else model

    settings = replace(
        ServeSettings.from_env(), auth=False, cache_entries=0, poll_seconds=0.5, registry={}
    )
    deployments = Deployments(config, poll_seconds=0.5, load_model=load).start(wait_s=120)
    app = create_app(settings, deployments=deployments)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    watcher = release.ReleaseWatcher(config, settings.resolved_log_dir(), interval_s=1.0).start()
    accounts = _accounts(paths)
    try:
        deadline = time.monotonic() + 120
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        echo(f"serving champion v{champion} at {url} (docs at {url}/docs)")
        echo(f"guardrails: {DEMO_POLICY}")
        with ModelRegistry(config) as registry:
            for broken in (True, False):
                if not broken:
                    faulty.clear()
                release.start_canary(
                    registry,
                    candidate,
                    DEMO_ACTOR,
                    share=0.3,
                    policy=DEMO_POLICY,
                    reason="demo: broken canary" if broken else "demo: canary",
                )
                label = "broken canary (every 5th call fails)" if broken else "canary"
                echo(f"{label} v{candidate} on 30% of accounts; traffic until the guardrails act")
                _wait(lambda: deployments.current.canary is not None)
                ok, failed = _traffic(url, accounts, _canary_gone(registry))
                decided = [
                    r
                    for r in registry.audit_records(limit=3)
                    if r.action in ("canary_rollback", "canary_pass")
                ]
                verdict = f"{decided[-1].action}: {decided[-1].reason}" if decided else "undecided"
                echo(f"    {ok} requests answered, {failed} failed; {verdict}")
                # The next canary must load afresh, so wait until the worker has let go of it.
                _wait(lambda: deployments.current.canary is None)
            if registry.champion() != champion:
                echo(
                    f"champion is now v{registry.champion()}; blue-green switch back to v{champion}"
                )
                release.assign_slot(registry, "green", champion, DEMO_ACTOR, "demo: switch back")
                release.switch(registry, DEMO_ACTOR, "demo: switch back to the loop's champion")
            deployments.refresh()
            echo(f"serving {deployments.current.versions()}")
            records = [r for r in registry.audit_records() if r.id > first_record]
    finally:
        watcher.stop()
        server.should_exit = True
        thread.join(timeout=30)
        deployments.stop()
        sock.close()
    for record in records:
        echo(
            f"  #{record.id} {record.action:<16} {record.actor:<22} "
            f"{record.from_version or '-':>3} -> {record.to_version or '-':<3} {record.reason[:70]}"
        )
    return records
