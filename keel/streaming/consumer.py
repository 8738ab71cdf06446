"""``keel stream consume``: a durable JetStream consumer that keeps the streaming features current.

Each batch of messages goes through two stages. First the log, in a worker thread: the new
events go into the SQLite log (duplicates recognised by event id), the touched accounts' windows
are recomputed from it and the log commits. Then the stores, in a process of their own
(``keel.streaming.store_process``): the windows go to Feast's online store (newest wins on event
time, then write time) and, as Parquet, to the push source's offline files, and only then is
the batch acknowledged. While one batch is in the stores the
next one is logged, and the one after travels from JetStream.

A process killed anywhere leaves every batch not yet in the stores unacknowledged; JetStream
delivers it again and each of its accounts is recomputed from the log, whether its events are
new to the log or not: nothing lost, nothing counted twice.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_threads
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from keel.streaming.events import EventError, decode
from keel.streaming.features import FEATURE_VIEW
from keel.streaming.state import HORIZON_US, EventLog
from keel.streaming.store_process import StoreProcess

if TYPE_CHECKING:
    from feast import FeatureStore

DEFAULT_URL = "nats://127.0.0.1:4222"
DEFAULT_STREAM = "KEEL_EVENTS"
DEFAULT_SUBJECT = "keel.events.account"
DEFAULT_DURABLE = "keel-stream"
# Logged batches that may wait for the store stage before the log stage waits for it; they wait
# unacknowledged, well inside the durable consumer's max_ack_pending.
MAX_WAITING_BATCHES = 4
# While it runs, the consumer's threads hand Python's interpreter lock over at least this often
# (Python's default is every 5 ms): a stage back from SQLite or a disk write, or the event loop
# with messages to read, waits that much less behind the other threads. 1.15x the events per
# second of the default, alternating on one stream.
SWITCH_INTERVAL_S = 0.001
# Freshness percentiles cover the most recent events only, so they describe the consumer now.
FRESHNESS_WINDOW = 20_000


@dataclass(frozen=True)
class StreamSettings:
    """Where the events come from and where the consumer keeps its state."""

    state_path: Path
    offline_dir: Path
    url: str = DEFAULT_URL
    stream: str = DEFAULT_STREAM
    subject: str = DEFAULT_SUBJECT
    durable: str = DEFAULT_DURABLE
    batch: int = 1_000
    ack_wait_s: float = 30.0


@dataclass
class ConsumeStats:
    """What one run of the consumer did."""

    messages: int = 0
    new_events: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    readback_mismatches: int = 0
    seconds: float = 0.0
    busy_s: float = 0.0  # from the start to the last batch acknowledged
    freshness_s: deque = field(default_factory=lambda: deque(maxlen=FRESHNESS_WINDOW))
    # The figures as of the last batch in the stores, for the log stage to record.
    latest_freshness: dict = field(default_factory=dict)

    def freshness(self) -> dict[str, float | None]:
        if not self.freshness_s:
            return {"freshness_p50_s": None, "freshness_p99_s": None}
        values = np.fromiter(self.freshness_s, dtype=np.float64)
        return {
            "freshness_p50_s": float(np.percentile(values, 50)),
            "freshness_p99_s": float(np.percentile(values, 99)),
        }


async def durable_subscription(js, settings: StreamSettings):
    """A pull subscription on the durable consumer, created on first use.

    Every message is acknowledged on its own. An acknowledgement that covers all earlier
    messages would also cover a batch that a killed process received and never processed,
    before JetStream delivers it again: those events would be lost.
    """
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    from keel.streaming.events import ensure_stream

    await ensure_stream(js, settings.stream, settings.subject)
    config = ConsumerConfig(
        durable_name=settings.durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.ack_wait_s,
        max_ack_pending=max(10 * settings.batch, 10_000),
    )
    return await js.pull_subscribe(
        settings.subject, durable=settings.durable, stream=settings.stream, config=config
    )


def stream_sequence(msg) -> int:
    """A JetStream message's stream sequence.

    Read off the reply subject (``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.``
    ``<consumer seq>.<time>.<pending>``) without building the rest of nats-py's metadata, a
    tenth of the time; other forms go through nats-py.
    """
    tokens = msg.reply.split(".") if msg.reply else ()
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[5])
    return msg.metadata.sequence.stream


@dataclass
class LoggedBatch:
    """A batch through the log stage: what the store stage writes and then acknowledges."""

    msgs: list
    first_seq: int
    last_seq: int
    windows: list[tuple]  # EventLog.windows rows of the accounts the batch touched
    published: list[float]  # publish times of its events, for freshness


def log_batch(log: EventLog, msgs: list, stats: ConsumeStats) -> LoggedBatch:
    """Log one batch's new events, recompute the touched accounts' windows, commit the log.

    Every account a message names is recomputed, also when its event is a duplicate: a batch
    delivered again after a crash before its acknowledgement reaches the stores that way.
    """
    events, published, accounts = [], [], set()
    seqs = [stream_sequence(msg) for msg in msgs]
    newest = log.newest_us()
    too_late = None if newest is None else newest - HORIZON_US
    log.begin()
    try:
        for msg, seq in zip(msgs, seqs, strict=True):
            try:
                event = decode(msg.data)
            except EventError as error:
                log.reject(seq, msg.data, str(error))
                stats.rejected += 1
                continue
            if too_late is not None and event["event_us"] < too_late:
                log.reject(seq, msg.data, "too late: over two days behind the newest event logged")
                stats.rejected += 1
                continue
            events.append(
                (event["id"], event["account_id"], event["event_us"], event["cents"], seq)
            )
            accounts.add(event["account_id"])
            if event.get("published_at") is not None:
                published.append(event["published_at"])
        new = log.add(events)
        windows = log.windows(sorted(accounts)) if accounts else []
        if stats.batches % 100 == 0:
            log.forget_unreachable()
        log.set_progress(
            {"last_stream_seq": max(seqs), "last_batch_at": time.time(), **stats.latest_freshness}
        )
        log.commit()
    except BaseException:
        log.rollback()
        raise
    stats.new_events += new
    stats.duplicates += len(events) - new
    return LoggedBatch(msgs, min(seqs), max(seqs), windows, published)


def store_batches(stage: StoreProcess, batches: list[LoggedBatch], stats: ConsumeStats) -> None:
    """Write logged batches' windows online and offline in the store process; then ack them.

    Batches that waited for the stores together go in one write (``store_process.write_groups``).
    """
    written = stage.write([(batch.first_seq, batch.last_seq, batch.windows) for batch in batches])
    if written is not None:
        servable, mismatch = written
        stats.readback_mismatches += int(mismatch)
        for batch in batches:
            stats.freshness_s.extend(servable - at for at in batch.published)
        stats.latest_freshness = stats.freshness()
    stats.messages += sum(len(batch.msgs) for batch in batches)
    stats.batches += len(batches)


async def acknowledge_all(nc, msgs: list) -> None:
    """Acknowledge each message, then wait until the server has them all."""
    for msg in msgs:
        await msg.ack()
    await nc.flush()


async def consume(
    settings: StreamSettings,
    store: FeatureStore,
    stop: asyncio.Event | None = None,
    idle_exit_s: float | None = None,
    max_batches: int | None = None,
    acknowledge: bool = True,
    max_events: int | None = None,
) -> ConsumeStats:
    """Consume until stopped, idle, or done with ``max_batches`` batches or ``max_events`` events.

    It stops when ``stop`` is set or ``idle_exit_s`` pass without a message.

    ``acknowledge=False`` processes without acknowledging, as a process killed just before its
    acks would (tests use it to see redelivery). While it runs, the process's interpreter lock
    switches threads every ``SWITCH_INTERVAL_S``.
    """
    import nats
    from nats.errors import TimeoutError as NatsTimeout

    stats = ConsumeStats()
    # The store process imports Feast while this one opens the log and connects.
    stage = StoreProcess(store, settings.offline_dir)
    try:
        log = EventLog(settings.state_path)
        nc = await nats.connect(settings.url)
        await asyncio.to_thread(stage.wait_ready)
    except BaseException:
        stage.close()
        raise
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(min(switch_interval, SWITCH_INTERVAL_S))
    # Two workers: a batch in the log stage while the ones before it are in the store stage.
    workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="keel-stream")
    threads: list[Future] = []
    started = time.perf_counter()
    idle_since = time.monotonic()
    logged_batches = 0
    fetching = storing = None
    waiting: list[LoggedBatch] = []  # logged, not yet in the stores

    def in_thread(function, *args):
        thread = workers.submit(function, *args)
        threads[:] = [t for t in threads if not t.done()] + [thread]
        return asyncio.wrap_future(thread)

    async def store_waiting() -> None:
        """Write the waiting batches, all of them at once, and acknowledge them; repeat."""
        while waiting:
            batches = waiting[:]
            waiting.clear()
            await in_thread(store_batches, stage, batches, stats)
            if acknowledge:
                await acknowledge_all(nc, [msg for batch in batches for msg in batch.msgs])
            stats.busy_s = time.perf_counter() - started

    try:
        sub = await durable_subscription(nc.jetstream(), settings)
        fetching = asyncio.ensure_future(sub.fetch(settings.batch, timeout=0.5))
        while not (stop is not None and stop.is_set()):
            if max_batches is not None and logged_batches >= max_batches:
                break
            if max_events is not None and stats.new_events >= max_events:
                break
            try:
                msgs = await fetching
            except (TimeoutError, NatsTimeout):
                msgs = None
            # The next batch travels while this one is logged (its acks wait for the stores).
            fetching = asyncio.ensure_future(sub.fetch(settings.batch, timeout=0.5))
            if msgs is None:
                if idle_exit_s is not None and time.monotonic() - idle_since >= idle_exit_s:
                    break
                continue
            if not msgs:  # a fetch that met only status messages
                continue
            # Logged while the batches before it go to the stores and are acknowledged.
            batch = await in_thread(log_batch, log, msgs, stats)
            logged_batches += 1
            waiting.append(batch)
            if storing is not None and (storing.done() or len(waiting) >= MAX_WAITING_BATCHES):
                await storing  # raises what the store stage raised
                storing = None
            if storing is None and waiting:
                storing = asyncio.ensure_future(store_waiting())
            # Idle counts from the end of the last batch: a slow batch is not a quiet stream.
            idle_since = time.monotonic()
        if storing is not None:
            await storing
        await store_waiting()
    finally:
        stats.seconds = time.perf_counter() - started
        sys.setswitchinterval(switch_interval)
        # Stopped or cancelled mid-batch: a thread may still hold the log; let it commit or
        # roll back before the log closes. Its batch stays unacknowledged and comes back.
        wait_for_threads(threads)
        workers.shutdown()
        await _give_back(nc, fetching)
        await nc.close()
        log.close()
        stage.close()
    return stats


async def _give_back(nc, fetching: asyncio.Future | None) -> None:
    """Hand a fetched but unprocessed batch back to JetStream, for delivery at once.

    Without this it would come back only after ``ack_wait``; a killed process skips it, and
    the batch comes back then, as any unacknowledged one.
    """
    from nats.errors import TimeoutError as NatsTimeout

    if fetching is None:
        return
    try:
        msgs = await fetching
    except (TimeoutError, NatsTimeout):
        return
    for msg in msgs:
        await msg.nak()
    await nc.flush()


def register_stream_features(store: FeatureStore) -> None:
    """Register the streaming feature view (``feature_repo/streaming.py``) if it is missing."""
    from feast.errors import FeatureViewNotFoundException

    try:
        store.get_feature_view(FEATURE_VIEW)
        return
    except FeatureViewNotFoundException:
        pass
    import importlib.util

    path = Path(store.repo_path) / "streaming.py"
    spec = importlib.util.spec_from_file_location("feature_repo.streaming", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"the streaming feature definitions {path} are missing")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    store.apply([module.account, module.account_stream_push, module.account_stream_fv])
