"""Streaming: the consumer's lag and freshness as an asset, and a sensor that alerts on lag.

The consumer itself (``keel stream consume``) runs outside Dagster as a long-lived process;
Dagster observes it through JetStream's record of the durable consumer and the consumer's log.
"""

import json

import dagster as dg

from orchestration.resources import MonitoringResource, StreamResource

GROUP = "streaming"


def _number(value) -> dg.MetadataValue:
    return dg.MetadataValue.float(float(value)) if value is not None else dg.MetadataValue.text("-")


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
