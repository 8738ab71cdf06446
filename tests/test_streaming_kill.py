"""100,000 events through JetStream with the consumer killed twice (kill -9) on the way."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest

from keel.generator import GeneratorConfig
from keel.streaming.events import day_events
from keel.streaming.features import FEATURE_VIEW, FEATURES, recompute

NATS_URL = "nats://127.0.0.1:4222"
EVENTS = 100_000
KILL_AT = (25_000, 60_000)  # acknowledged events before each kill
# Events arrive while the consumer runs (and dies), as from a live source.
RATE = 800.0


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (Linux's /proc), its store process among them."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def acknowledged(stream: str, durable: str) -> int:
    from keel.streaming.lag import consumer_lag

    lag = asyncio.run(consumer_lag(NATS_URL, stream, durable))
    return lag["ack_floor_stream_seq"] if lag["found"] else 0


@pytest.mark.slow
def test_a_consumer_killed_twice_loses_and_double_counts_nothing(keel_home, record_property):
    import nats

    from keel.features import open_store
    from keel.streaming.consumer import register_stream_features
    from keel.streaming.events import DayEvents, ensure_stream, publish
    from keel.streaming.state import EventLog

    suffix = uuid.uuid4().hex[:10]
    stream, subject, durable = f"KEEL_KILL_{suffix}", f"keel.kill.{suffix}", f"kill-{suffix}"
    config = GeneratorConfig(accounts=8_000, seed=17)
    days = [day_events(config, date(2026, 1, 5) + timedelta(days=i)) for i in range(8)]
    events = DayEvents(
        day=days[0].day,
        **{
            name: np.concatenate([getattr(d, name) for d in days])[:EVENTS]
            for name in ("event_id", "account_id", "event_us", "cents")
        },
    )
    assert len(events) == EVENTS

    async def create_stream() -> None:
        nc = await nats.connect(NATS_URL)
        await ensure_stream(nc.jetstream(), stream, subject)
        await nc.close()

    async def publish_all() -> int:
        nc = await nats.connect(NATS_URL)
        stored = await publish(nc.jetstream(), subject, events, RATE)
        await nc.close()
        return stored

    published: list[int] = []
    # The publisher has its own thread and event loop; the consumer is another process.
    publisher = threading.Thread(target=lambda: published.append(asyncio.run(publish_all())))

    store = open_store()
    register_stream_features(store)
    command = [
        *(sys.executable, "-m", "keel.streaming.cli"),
        *("consume", "--url", NATS_URL, "--stream", stream, "--subject", subject),
        *("--durable", durable, "--batch", "2000"),
    ]
    env = {**os.environ, "KEEL_HOME": str(keel_home.home)}
    state = keel_home.home / "streaming" / f"{durable}.sqlite"
    try:
        asyncio.run(create_stream())
        publisher.start()
        logged_at_kill = []
        for threshold in KILL_AT:
            consumer = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 600
            while acknowledged(stream, durable) < threshold:
                assert consumer.poll() is None, "the consumer stopped on its own"
                assert time.monotonic() < deadline, f"{threshold} events not acknowledged in time"
                time.sleep(0.2)
            started = children(consumer.pid)
            assert started, "the consumer runs its store stage in a process of its own"
            os.kill(consumer.pid, signal.SIGKILL)
            consumer.wait()
            # The store process dies with the consumer: no writer outlives it.
            gone_by = time.monotonic() + 10
            while any(running(pid) for pid in started) and time.monotonic() < gone_by:
                time.sleep(0.05)
            assert not any(running(pid) for pid in started), "a child outlived the consumer"
            log = EventLog(state)
            logged_at_kill.append(log.counts()["events_counted"])
            log.close()
        # The last consumer runs until every event is acknowledged, then stops on SIGTERM.
        final = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 900
        while publisher.is_alive() or acknowledged(stream, durable) < EVENTS:
            assert final.poll() is None, "the consumer stopped on its own"
            assert time.monotonic() < deadline, "not every event acknowledged in time"
            time.sleep(0.5)
        final.send_signal(signal.SIGTERM)
        output, _ = final.communicate(timeout=120)
        assert final.returncode == 0
        stats = json.loads(output)
    finally:
        if publisher.is_alive():
            publisher.join()

        async def delete():
            nc = await nats.connect(NATS_URL)
            await nc.jetstream().delete_stream(stream)
            await nc.close()

        asyncio.run(delete())

    assert published == [EVENTS]
    # Each kill came mid-stream, and the restarted consumer picked up where the log stood.
    assert KILL_AT[0] <= logged_at_kill[0] < logged_at_kill[1] < EVENTS
    log = EventLog(state)
    counts = log.counts()
    log.close()
    # The log keeps three days of events (windows need one); the count covers all of them.
    assert counts["events_counted"] == EVENTS and counts["rejected"] == 0
    assert stats["new_events"] == EVENTS - logged_at_kill[1]

    expected = recompute(events.account_id, events.event_us, events.cents)
    refs = [f"{FEATURE_VIEW}:{name}" for name in FEATURES]
    rows = [{"account_id": int(a)} for a in expected["account_id"]]
    online = store.get_online_features(features=refs, entity_rows=rows).to_dict()
    for name in FEATURES:
        assert np.array_equal(np.array(online[name]), expected[name].to_numpy()), name

    # Over the final run's events, the backlog left by the second kill and restart included.
    record_property("freshness_p50_s", stats["freshness_p50_s"])
    record_property("freshness_p99_s", stats["freshness_p99_s"])
    print(
        f"freshness over the final run: p50 {stats['freshness_p50_s']:.2f} s, "
        f"p99 {stats['freshness_p99_s']:.2f} s; counted at the kills: {logged_at_kill}"
    )
