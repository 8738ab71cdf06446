"""How far the consumer is behind: JetStream's view of the durable consumer and the log's."""

from __future__ import annotations

import time
from pathlib import Path

from keel.streaming.state import EventLog


async def consumer_lag(url: str, stream: str, durable: str) -> dict:
    """Messages the durable consumer has not acknowledged yet, from the server's records."""
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        try:
            stream_info = await js.stream_info(stream)
            info = await js.consumer_info(stream, durable)
        except NotFoundError:
            return {"found": False, "unacknowledged": None}
        return {
            "found": True,
            # Not yet delivered plus delivered but not acknowledged: the work still to do.
            "unacknowledged": int(info.num_pending or 0) + int(info.num_ack_pending or 0),
            "redelivered": int(info.num_redelivered or 0),
            "ack_floor_stream_seq": int(info.ack_floor.stream_seq if info.ack_floor else 0),
            "stream_last_seq": int(stream_info.state.last_seq),
            "stream_messages": int(stream_info.state.messages),
        }
    finally:
        await nc.close()


def log_progress(state_path: str | Path) -> dict:
    """The consumer's own record: its last batch, freshness percentiles and event counts."""
    if not Path(state_path).exists():
        return {"last_batch_age_s": None}
    log = EventLog(state_path)
    try:
        progress = log.progress()
        counts = log.counts()
    finally:
        log.close()
    last = progress.get("last_batch_at")
    return {
        **progress,
        **counts,
        "last_batch_age_s": None if last is None else max(0.0, time.time() - last),
    }


def lag_breaches(
    lag: dict, progress: dict, max_unacknowledged: int, max_stalled_s: float
) -> list[str]:
    """Why the consumer is behind, in words; empty when it keeps up.

    Behind means more unacknowledged messages than ``max_unacknowledged``, or messages
    waiting while the last batch is older than ``max_stalled_s`` (a stopped consumer).
    """
    if not lag.get("found"):
        return ["the durable consumer does not exist: keel stream consume has never run"]
    breaches = []
    waiting = lag["unacknowledged"]
    if waiting > max_unacknowledged:
        breaches.append(f"{waiting} messages unacknowledged (limit {max_unacknowledged})")
    age = progress.get("last_batch_age_s")
    if waiting and (age is None or age > max_stalled_s):
        since = "ever" if age is None else f"for {age:.0f} s"
        breaches.append(f"{waiting} messages waiting and no batch processed {since}")
    return breaches
