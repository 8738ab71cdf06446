"""The consumer-lag asset and the lag sensor, against a real JetStream stream."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import date

import dagster as dg
import pytest

from assets.streaming import stream_consumer_lag, stream_lag_sensor
from keel.streaming.lag import lag_breaches
from orchestration.resources import MonitoringResource, StreamResource

NATS_URL = "nats://127.0.0.1:4222"


def test_lag_breaches_name_a_backlog_and_a_stalled_consumer():
    keeping_up = {"found": True, "unacknowledged": 10}
    assert lag_breaches(keeping_up, {"last_batch_age_s": 1.0}, 100, 60) == []
    assert lag_breaches(keeping_up, {"last_batch_age_s": 90.0}, 100, 60) == [
        "10 messages waiting and no batch processed for 90 s"
    ]
    backlog = {"found": True, "unacknowledged": 500}
    assert lag_breaches(backlog, {"last_batch_age_s": 1.0}, 100, 60) == [
        "500 messages unacknowledged (limit 100)"
    ]
    idle = {"found": True, "unacknowledged": 0}
    assert lag_breaches(idle, {"last_batch_age_s": 9_999.0}, 100, 60) == []
    assert "never run" in lag_breaches({"found": False}, {}, 100, 60)[0]


@pytest.fixture
def waiting_stream(tmp_path):
    """A stream with 12 messages that its durable consumer has not acknowledged."""
    import nats

    from keel.streaming.consumer import StreamSettings, durable_subscription

    suffix = uuid.uuid4().hex[:10]
    settings = StreamSettings(
        state_path=tmp_path / f"{suffix}.sqlite",
        offline_dir=tmp_path / "offline",
        stream=f"KEEL_LAG_{suffix}",
        subject=f"keel.lag.{suffix}",
        durable=suffix,
    )

    async def create():
        nc = await nats.connect(NATS_URL)
        js = nc.jetstream()
        await durable_subscription(js, settings)
        for i in range(12):
            await js.publish(settings.subject, json.dumps({"i": i}).encode())
        await nc.close()

    async def delete():
        nc = await nats.connect(NATS_URL)
        await nc.jetstream().delete_stream(settings.stream)
        await nc.close()

    asyncio.run(create())
    yield StreamResource(
        url=NATS_URL,
        stream=settings.stream,
        durable=settings.durable,
        state_dir=str(tmp_path),
        max_unacknowledged=5,
    )
    asyncio.run(delete())


def test_the_asset_reports_the_backlog_and_the_sensor_alerts_once_per_episode(waiting_stream):
    result = stream_consumer_lag(stream=waiting_stream)
    assert result.metadata["unacknowledged"].value == 12
    assert result.metadata["stream_last_seq"].value == 12
    assert result.metadata["events_counted"].value == 0

    instance = dg.DagsterInstance.ephemeral()
    resources = {"stream": waiting_stream, "monitoring": MonitoringResource()}
    context = dg.build_sensor_context(instance=instance, resources=resources)
    first = stream_lag_sensor(context)
    assert len(first.run_requests) == 1
    assert json.loads(first.cursor) == {"behind": True}
    again = dg.build_sensor_context(instance=instance, resources=resources, cursor=first.cursor)
    second = stream_lag_sensor(again)
    assert not second.run_requests
    assert "12 messages unacknowledged" in second.skip_reason.skip_message

    assert "no batch processed ever" in second.skip_reason.skip_message

    # Caught up: everything acknowledged ends the episode, so the next lag alerts again.
    async def acknowledge_all():
        import nats

        nc = await nats.connect(NATS_URL)
        js = nc.jetstream()
        sub = await js.pull_subscribe_bind(waiting_stream.durable, stream=waiting_stream.stream)
        msgs = await sub.fetch(12, timeout=5)
        for msg in msgs:
            await msg.ack()
        await nc.flush()
        await nc.close()

    asyncio.run(acknowledge_all())
    calm = dg.build_sensor_context(instance=instance, resources=resources, cursor=first.cursor)
    third = stream_lag_sensor(calm)
    assert not third.run_requests and json.loads(third.cursor) == {"behind": False}


def test_the_asset_fails_clearly_when_no_consumer_exists(tmp_path):
    missing = StreamResource(
        url=NATS_URL, stream=f"KEEL_NONE_{uuid.uuid4().hex[:8]}", state_dir=str(tmp_path)
    )
    with pytest.raises(dg.Failure, match="keel stream consume"):
        stream_consumer_lag(stream=missing)


def test_keel_stream_publish_stores_a_day_once_and_status_reads_the_backlog(keel_home):
    from click.testing import CliRunner

    from keel.cli import cli

    suffix = uuid.uuid4().hex[:10]
    where = ["--url", NATS_URL, "--stream", f"KEEL_CLI_{suffix}", "--subject", f"keel.cli.{suffix}"]
    day = ["--day", "2026-01-06", "--accounts", "60", "--seed", "4"]
    runner = CliRunner()
    try:
        first = runner.invoke(cli, ["stream", "publish", *where, *day])
        assert first.exit_code == 0, first.output
        counts = json.loads(first.output)["2026-01-06"]
        assert counts["events"] > 0 and counts["stored"] == counts["events"]
        # Publishing the same day again stores nothing: each event id is stored once.
        again = json.loads(runner.invoke(cli, ["stream", "publish", *where, *day]).output)
        assert again["2026-01-06"] == {"events": counts["events"], "stored": 0}
        status = runner.invoke(cli, ["stream", "status", *where, "--durable", "nobody"])
        assert status.exit_code == 0, status.output
        assert json.loads(status.output)["found"] is False
    finally:

        async def delete():
            import nats

            nc = await nats.connect(NATS_URL)
            await nc.jetstream().delete_stream(f"KEEL_CLI_{suffix}")
            await nc.close()

        asyncio.run(delete())


def test_a_days_events_are_published_as_a_stream_once_however_often_the_asset_runs(
    small_sources, tmp_path
):
    import nats
    from nats.js.api import StorageType, StreamConfig

    from assets.streaming import stream_day_events
    from keel.streaming.events import DUPLICATE_WINDOW_S, day_events

    suffix = uuid.uuid4().hex[:10]
    stream = StreamResource(
        url=NATS_URL,
        stream=f"KEEL_DAY_{suffix}",
        subject=f"keel.day.{suffix}",
        state_dir=str(tmp_path),
    )

    async def stream_call(call):
        nc = await nats.connect(NATS_URL)
        try:
            return await call(nc.jetstream())
        finally:
            await nc.close()

    # A stream made before, with JetStream's default two-minute memory of message ids.
    config = StreamConfig(
        name=stream.stream,
        subjects=[stream.subject],
        storage=StorageType.FILE,
        duplicate_window=120.0,
    )
    asyncio.run(stream_call(lambda js: js.add_stream(config)))
    resources = {"sources": small_sources, "stream": stream}
    try:
        first = dg.materialize([stream_day_events], resources=resources, partition_key="2026-01-06")
        # A backfill over that day and the next: one run, the first day recognised by its ids.
        both = dg.materialize(
            [stream_day_events],
            resources=resources,
            tags={
                "dagster/asset_partition_range_start": "2026-01-06",
                "dagster/asset_partition_range_end": "2026-01-07",
            },
        )
        info = asyncio.run(stream_call(lambda js: js.stream_info(stream.stream)))
    finally:
        asyncio.run(stream_call(lambda js: js.delete_stream(stream.stream)))

    generator = small_sources.generator_config()
    sixth = len(day_events(generator, date(2026, 1, 6)))
    seventh = len(day_events(generator, date(2026, 1, 7)))
    (published,) = first.asset_materializations_for_node("stream_day_events")
    assert published.metadata["stored"].value == sixth > 0
    assert published.metadata["already_published"].value == 0
    materialized = both.asset_materializations_for_node("stream_day_events")
    assert sorted(m.partition for m in materialized) == ["2026-01-06", "2026-01-07"]
    per_day = materialized[0].metadata["per_day"].value
    assert per_day == {
        "2026-01-06": {"events": sixth, "stored": 0},
        "2026-01-07": {"events": seventh, "stored": seventh},
    }
    # The stream holds every event once, and now remembers ids for a day.
    assert info.state.messages == sixth + seventh
    assert info.config.duplicate_window == DUPLICATE_WINDOW_S
