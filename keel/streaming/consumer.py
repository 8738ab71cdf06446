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
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_threads
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from keel import schema
from keel.streaming.events import EventError, decode
from keel.streaming.features import FEATURE_VIEW, FEATURES
from keel.streaming.state import HORIZON_US, EventLog
from keel.streaming.store_process import StoreProcess

if TYPE_CHECKING:
    import pyarrow as pa
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
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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


class FeatureWriter:
    """Writes window rows to Feast's online store and to the push source's offline files.

    On Keel's SQLite store rows go in as plain numbers
    (``keel.mirrors.feast_sqlite_numeric_write``: the store's own rows and newest-wins rule);
    on others, to the store's ``online_write_batch`` as protos built here: Feast's
    ``write_to_online_store`` first converts a DataFrame to those protos, a quarter of its time
    for 1,000 rows when measured. Feast's offline push for file sources rereads and rewrites the
    whole Parquet file on every push; here each batch adds a file of its own.
    """

    def __init__(self, store: FeatureStore, offline_dir: Path):
        from feast.infra.online_stores.helpers import get_online_store_from_config

        from keel.mirrors.feast_online_stores import KeelSqliteOnlineStore

        self.store = store
        self.config = store.config
        self.online = get_online_store_from_config(store.config.online_store)
        self.view = store.get_feature_view(FEATURE_VIEW)
        # On the SQLite store rows go in as plain numbers: building and unpacking the protos
        # cost more than the database's own work when profiled.
        self.numeric = None
        if isinstance(self.online, KeelSqliteOnlineStore):
            from keel.mirrors.feast_sqlite_numeric_write import NumericRowWriter

            kinds = {n: "double" if t == "Float64" else "int64" for n, t in FEATURES.items()}
            self.numeric = NumericRowWriter(
                self.online, self.config, self.view, schema.ENTITY_KEY, kinds
            )
        self.offline_dir = Path(offline_dir)
        self.scratch = self.offline_dir.parent / f".{self.offline_dir.name}.scratch"
        self.offline_dir.mkdir(parents=True, exist_ok=True)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.offline_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keel-offline")
        # Feast's first online read imports modules for seconds, Parquet's writer for a fraction
        # of one: pay both before any event waits.
        self.read_back(0)
        import pyarrow.parquet  # noqa: F401

    def write(self, windows: list[tuple], first_seq: int, last_seq: int) -> pa.Table:
        """Write ``EventLog.windows`` rows online and offline; return them as the offline table."""
        import pyarrow as pa

        written_at = datetime.now(UTC)
        columns = list(zip(*windows, strict=True))
        spend_1h = np.asarray(columns[2], dtype=np.int64) / 100.0
        spend_today = np.asarray(columns[4], dtype=np.int64) / 100.0
        hour_count = np.asarray(columns[3], dtype=np.int64)
        day_count = np.asarray(columns[5], dtype=np.int64)
        table = pa.table(
            {
                schema.ENTITY_KEY: pa.array(columns[0], pa.int64()),
                schema.EVENT_TIMESTAMP: pa.array(columns[1], pa.int64()).cast(
                    pa.timestamp("us", tz="UTC")
                ),
                schema.CREATED_TIMESTAMP: pa.array(
                    [written_at] * len(windows), pa.timestamp("us", tz="UTC")
                ),
                "spend_1h": pa.array(spend_1h),
                "transactions_1h": pa.array(hour_count),
                "spend_today": pa.array(spend_today),
                "transactions_today": pa.array(day_count),
            }
        )
        # The offline file is written and synced to disk while the online store writes and
        # syncs its own; the call returns when both are done.
        offline = self.offline_writer.submit(self._write_offline, table, first_seq, last_seq)
        try:
            if self.numeric is not None:
                values = [spend_1h, hour_count, spend_today, day_count]
                self.numeric.write_columns(columns[0], columns[1], values, written_at)
            else:
                self.online.online_write_batch(
                    self.config, self.view, _proto_rows(windows, written_at), None
                )
        finally:
            offline.result()
        return table

    def _write_offline(self, table: pa.Table, first_seq: int, last_seq: int) -> None:
        import pyarrow.parquet as pq

        from keel.files import replace_durably

        # Named by the batch's stream sequences: the same batch delivered again replaces its
        # file; a batch cut differently after a crash repeats equal values, which
        # point-in-time retrieval (latest write time) reads once.
        scratch = self.scratch / f"{uuid.uuid4().hex}.parquet"
        pq.write_table(table, scratch)
        replace_durably(scratch, self.offline_dir / f"{first_seq:012d}-{last_seq:012d}.parquet")

    def read_back(self, account_id: int) -> dict:
        """One account's values read through the online store, as serving reads them."""
        refs = [f"{FEATURE_VIEW}:{name}" for name in FEATURES]
        values = self.store.get_online_features(
            features=refs, entity_rows=[{schema.ENTITY_KEY: int(account_id)}]
        ).to_dict()
        return {name: values[name][0] for name in FEATURES}


def _proto_rows(windows: list[tuple], written_at: datetime) -> list[tuple]:
    """``EventLog.windows`` rows as the protos of an online store's ``online_write_batch``."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    rows = []
    for account, newest, hour_cents, hour_count, day_cents, day_count in windows:
        key = EntityKey(join_keys=[schema.ENTITY_KEY], entity_values=[Value(int64_val=account)])
        values = {
            "spend_1h": Value(double_val=hour_cents / 100.0),
            "transactions_1h": Value(int64_val=hour_count),
            "spend_today": Value(double_val=day_cents / 100.0),
            "transactions_today": Value(int64_val=day_count),
        }
        rows.append((key, values, _EPOCH + timedelta(microseconds=newest), written_at))
    return rows


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
