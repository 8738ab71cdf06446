"""Streaming: a day's events published as a stream, the consumer's lag and freshness, an alert.

The consumer itself (``keel stream consume``) runs outside Dagster as a long-lived process;
Dagster publishes the generator's days to JetStream and observes the consumer through
JetStream's record of the durable consumer and the consumer's log.
"""

import json

import dagster as dg

from assets.partitions import DAILY_PARTITIONS
from orchestration.resources import MonitoringResource, SourcesResource, StreamResource

GROUP = "streaming"


def _number(value) -> dg.MetadataValue:
    return dg.MetadataValue.float(float(value)) if value is not None else dg.MetadataValue.text("-")


@dg.asset(
    group_name=GROUP,
    kinds={"nats"},
    partitions_def=DAILY_PARTITIONS,
    # A backfill publishes its days in one run, oldest first: the consumer sets aside events
    # over two days behind the newest it has logged.
    backfill_policy=dg.BackfillPolicy.single_run(),
)
def stream_day_events(
    context: dg.AssetExecutionContext, sources: SourcesResource, stream: StreamResource
) -> dg.MaterializeResult:
    """The generator's transactions of each partition's day, published to JetStream in time order.

    Each event's id travels as ``Nats-Msg-Id``: a re-run within the stream's duplicate window
    (a day) stores nothing twice, and the consumer counts an event once whenever it comes.
    """
    import asyncio
    from datetime import date

    from keel.streaming.events import publish_days

    days = sorted(date.fromisoformat(key) for key in context.partition_keys)
    counts = asyncio.run(
        publish_days(stream.url, stream.stream, stream.subject, sources.generator_config(), days)
    )
    events = sum(day["events"] for day in counts.values())
    stored = sum(day["stored"] for day in counts.values())
    context.log.info(
        f"{stream.stream} ({stream.subject}): {stored} of {events} events stored, "
        f"{events - stored} already there"
    )
    return dg.MaterializeResult(
        metadata={
            "events": dg.MetadataValue.int(events),
            "stored": dg.MetadataValue.int(stored),
            "already_published": dg.MetadataValue.int(events - stored),
            "per_day": dg.MetadataValue.json(counts),
            "stream": dg.MetadataValue.text(stream.stream),
            "subject": dg.MetadataValue.text(stream.subject),
        }
    )


@dg.asset(group_name=GROUP, kinds={"nats", "feast"})
def stream_consumer_lag(stream: StreamResource) -> dg.MaterializeResult:
    """Lag and freshness of the streaming-feature consumer, as measured now."""
    lag, progress = stream.observe()
    if not lag["found"]:
        raise dg.Failure(
            description=f"No durable consumer {stream.durable} on stream {stream.stream}: start "
            "`keel stream consume` first."
        )
    return dg.MaterializeResult(
        metadata={
            "unacknowledged": dg.MetadataValue.int(lag["unacknowledged"]),
            "ack_floor_stream_seq": dg.MetadataValue.int(lag["ack_floor_stream_seq"]),
            "stream_last_seq": dg.MetadataValue.int(lag["stream_last_seq"]),
            "freshness_p50_s": _number(progress.get("freshness_p50_s")),
            "freshness_p99_s": _number(progress.get("freshness_p99_s")),
            "last_batch_age_s": _number(progress.get("last_batch_age_s")),
            "events_counted": dg.MetadataValue.int(progress.get("events_counted", 0)),
            "events_rejected": dg.MetadataValue.int(progress.get("rejected", 0)),
        }
    )


@dg.sensor(
    minimum_interval_seconds=30,
    asset_selection=[stream_consumer_lag],
    description="Alerts when the streaming-feature consumer falls behind or stops.",
)
def stream_lag_sensor(
    context: dg.SensorEvaluationContext, stream: StreamResource, monitoring: MonitoringResource
):
    """One alert per episode of lag (the cursor remembers it), with a run that records the lag."""
    from keel.serving.release import post_alert
    from keel.streaming.lag import lag_breaches

    lag, progress = stream.observe()
    breaches = lag_breaches(lag, progress, stream.max_unacknowledged, stream.max_stalled_s)
    behind = bool(breaches)
    cursor = json.dumps({"behind": behind})
    if not behind or context.cursor == cursor:
        state = "; ".join(breaches) or f"{lag.get('unacknowledged')} unacknowledged"
        return dg.SensorResult(skip_reason=state, cursor=cursor)
    text = f"Keel stream consumer {stream.durable} is behind: {'; '.join(breaches)}"
    post_alert(monitoring.webhook_url, {"text": text, "lag": lag, "progress": progress})
    if not lag["found"]:
        return dg.SensorResult(skip_reason=text, cursor=cursor)
    # The run records the lag in the asset's history, where the episode can be seen later.
    run_key = f"stream-lag-{lag['ack_floor_stream_seq']}-{lag['unacknowledged']}"
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=run_key)], cursor=cursor)


STREAM_SENSORS = [stream_lag_sensor]
