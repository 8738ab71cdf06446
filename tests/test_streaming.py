"""Streaming features: window maths, event checks, and a consumer on a real JetStream and Feast."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid
from datetime import date

import numpy as np
import pytest

from keel.generator import GeneratorConfig
from keel.streaming.events import EventError, day_events, decode, encode
from keel.streaming.features import DAY_US, FEATURE_VIEW, FEATURES, HOUR_US, recompute

NATS_URL = "nats://127.0.0.1:4222"
MIDNIGHT = 1_767_571_200_000_000  # 2026-01-05 00:00 UTC in microseconds


def test_windows_count_the_last_hour_and_the_day_of_the_newest_event():
    account = np.array([1, 1, 1, 1, 2, 2])
    event_us = np.array(
        [
            MIDNIGHT - 1,  # yesterday: in the hour before 00:30, not in today
            MIDNIGHT + 10 * 60 * 10**6,
            MIDNIGHT + 30 * 60 * 10**6,  # newest of account 1: 00:30
            MIDNIGHT - HOUR_US,  # 23:00 yesterday: in neither window of account 1
            MIDNIGHT + 5 * HOUR_US - HOUR_US,  # exactly one hour before account 2's newest
            MIDNIGHT + 5 * HOUR_US,
        ]
    )
    cents = np.array([100, 250, 5, 7, 1_000, 2_000])
    frame = recompute(account, event_us, cents).set_index("account_id")
    # Account 1 (newest 00:30): the hour holds 23:59:59.999999, 00:10, 00:30; the day 00:10, 00:30.
    assert frame.loc[1, "spend_1h"] == pytest.approx(3.55)
    assert frame.loc[1, "transactions_1h"] == 3
    assert frame.loc[1, "spend_today"] == pytest.approx(2.55)
    assert frame.loc[1, "transactions_today"] == 2
    # Account 2 (newest 05:00): the event at 04:00 sharp is outside the half-open hour.
    assert frame.loc[2, "transactions_1h"] == 1 and frame.loc[2, "spend_1h"] == pytest.approx(20.0)
    assert frame.loc[2, "transactions_today"] == 2 and frame.loc[2, "spend_today"] == 30.0
    assert frame.loc[2, "event_us"] == MIDNIGHT + 5 * HOUR_US
    assert DAY_US == 24 * HOUR_US


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"id": "a", "account_id": 1, "event_us": 5}', "missing field(s) cents"),
        (b'{"id": "a", "account_id": "1", "event_us": 5, "cents": 1}', "account_id must be"),
        (b'{"id": "a", "account_id": 1, "event_us": 5, "cents": -1}', "must not be negative"),
        (b'{"id": "", "account_id": 1, "event_us": 5, "cents": 1}', "id must be"),
    ],
)
def test_unreadable_events_are_refused_with_the_reason(body, reason):
    with pytest.raises(EventError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        decode(body)


def test_a_days_events_are_repeatable_and_share_out_the_days_spend():
    from keel.generator import activity_table

    config = GeneratorConfig(accounts=300, seed=11)
    day = date(2026, 1, 7)
    first, again = day_events(config, day), day_events(config, day)
    assert np.array_equal(first.event_us, again.event_us)
    assert np.array_equal(first.cents, again.cents)
    assert np.all(np.diff(first.event_us) >= 0)
    activity = activity_table(config, day)
    assert len(first) == int(np.sum(activity["n_transactions"].to_numpy()))
    spend = dict(
        zip(activity["account_id"].to_pylist(), activity["spend_amount"].to_pylist(), strict=True)
    )
    per_account = np.bincount(first.account_id, weights=first.cents)
    for account in np.unique(first.account_id)[:50]:
        # Rounding each share to the cent moves the total by at most half a cent per share.
        shares = int(np.sum(first.account_id == account))
        assert abs(per_account[account] / 100 - spend[account]) <= 0.005 * shares + 1e-9
    body = json.loads(encode(first.event_id[0], 3, 4, 5))
    assert decode(json.dumps(body).encode())["account_id"] == 3


@pytest.fixture
def stream_names():
    """A JetStream stream and consumer of the test's own, deleted afterwards."""
    suffix = uuid.uuid4().hex[:10]
    names = {"stream": f"KEEL_TEST_{suffix}", "subject": f"keel.test.{suffix}", "durable": suffix}
    yield names

    async def delete():
        import nats
        from nats.js.errors import NotFoundError

        nc = await nats.connect(NATS_URL)
        with contextlib.suppress(NotFoundError):  # never created when the test failed early
            await nc.jetstream().delete_stream(names["stream"])
        await nc.close()

    asyncio.run(delete())


def test_the_log_counts_an_event_once_and_its_windows_equal_the_batch_recomputation(tmp_path):
    from keel.streaming.state import EventLog

    events = day_events(GeneratorConfig(accounts=400, seed=5), date(2026, 1, 9))
    rows = [
        (
            events.event_id[i],
            int(events.account_id[i]),
            int(events.event_us[i]),
            int(events.cents[i]),
            i,
        )
        for i in range(len(events))
    ]
    log = EventLog(tmp_path / "log.sqlite")
    half = len(rows) // 2
    assert log.add(rows[:half]) == half
    # Redelivery: the first half again, with the rest.
    assert log.add(rows) == len(rows) - half
    windows = log.windows(sorted(set(events.account_id.tolist())))
    assert log.counts() == {"events_counted": len(rows), "events_logged": len(rows), "rejected": 0}
    log.close()
    expected = recompute(events.account_id, events.event_us, events.cents)
    got = np.array(windows, dtype=np.int64)
    assert np.array_equal(got[:, 0], expected["account_id"].to_numpy())
    assert np.array_equal(got[:, 1], expected["event_us"].to_numpy())
    assert np.array_equal(got[:, 2] / 100.0, expected["spend_1h"].to_numpy())
    assert np.array_equal(got[:, 3], expected["transactions_1h"].to_numpy())
    assert np.array_equal(got[:, 4] / 100.0, expected["spend_today"].to_numpy())
    assert np.array_equal(got[:, 5], expected["transactions_today"].to_numpy())


def test_an_event_taken_just_inside_the_horizon_still_finds_its_whole_day(tmp_path):
    from keel.streaming.state import HORIZON_US, EventLog

    log = EventLog(tmp_path / "log.sqlite")
    newest = MIDNIGHT + 2 * DAY_US + 12 * HOUR_US
    # Account 1's morning event, then the stream moves on two and a half days (account 2).
    log.add([("a", 1, MIDNIGHT + 11 * HOUR_US, 500, 1), ("b", 2, newest, 100, 2)])
    log.forget_unreachable()
    # Redelivered after a crash: account 1's afternoon, late but inside the horizon.
    late = MIDNIGHT + 13 * HOUR_US
    assert late >= newest - HORIZON_US
    log.add([("c", 1, late, 250, 3)])
    assert log.windows([1]) == [(1, late, 250, 1, 750, 2)]
    log.close()


def online_values(store, accounts) -> dict[str, np.ndarray]:
    refs = [f"{FEATURE_VIEW}:{name}" for name in FEATURES]
    rows = [{"account_id": int(a)} for a in accounts]
    values = store.get_online_features(features=refs, entity_rows=rows).to_dict()
    return {name: np.array(values[name]) for name in FEATURES}


@pytest.mark.slow
def test_redelivered_and_malformed_events_change_nothing_and_training_sees_the_online_values(
    keel_home, stream_names
):
    import nats
    import pandas as pd

    from keel.features import open_store
    from keel.streaming.consumer import StreamSettings, consume, register_stream_features
    from keel.streaming.events import ensure_stream, publish
    from keel.streaming.features import OFFLINE_FOLDER

    store = open_store()
    register_stream_features(store)
    events = day_events(GeneratorConfig(accounts=250, seed=3), date(2026, 1, 5))
    settings = StreamSettings(
        state_path=keel_home.home / "streaming" / "test.sqlite",
        offline_dir=keel_home.home / OFFLINE_FOLDER,
        url=NATS_URL,
        batch=100,
        ack_wait_s=1.0,
        **stream_names,
    )

    async def run():
        nc = await nats.connect(NATS_URL)
        js = nc.jetstream()
        await ensure_stream(js, settings.stream, settings.subject)
        stored = await publish(js, settings.subject, events)
        # The same day again: JetStream's duplicate window stores none of it.
        stored_again = await publish(js, settings.subject, events)
        await js.publish(settings.subject, b'{"id": "broken", "account_id": "x"}')
        await nc.close()
        # A consumer that dies before acknowledging: its batches come back after ack_wait.
        crashed = await consume(settings, store, max_batches=2, acknowledge=False)
        await asyncio.sleep(1.5)
        resumed = await consume(settings, store, idle_exit_s=2.5)
        return stored, stored_again, crashed, resumed

    switch_interval = sys.getswitchinterval()
    stored, stored_again, crashed, resumed = asyncio.run(run())
    # The consumer's shorter interpreter-lock interval ends with it.
    assert sys.getswitchinterval() == switch_interval
    assert stored == len(events) and stored_again == 0
    assert crashed.new_events == 200
    assert resumed.duplicates >= 200  # the unacknowledged batches, delivered again
    assert crashed.new_events + resumed.new_events == len(events)
    assert resumed.rejected == 1 and resumed.readback_mismatches == 0

    expected = recompute(events.account_id, events.event_us, events.cents)
    online = online_values(store, expected["account_id"])
    for name in FEATURES:
        assert np.array_equal(online[name], expected[name].to_numpy()), name

    # The offline copy gives a training row the value serving read at the same instant.
    entity_df = pd.DataFrame(
        {
            "account_id": expected["account_id"],
            "event_timestamp": pd.to_datetime(expected["event_us"], unit="us", utc=True),
        }
    )
    refs = [f"{FEATURE_VIEW}:{name}" for name in FEATURES]
    training = (
        store.get_historical_features(entity_df=entity_df, features=refs)
        .to_df()
        .sort_values("account_id")
    )
    for name in FEATURES:
        assert np.array_equal(training[name].to_numpy(), expected[name].to_numpy()), name

    from keel.streaming.state import EventLog

    log = EventLog(settings.state_path)
    rejected = log.connection.execute("SELECT reason FROM rejected").fetchall()
    log.close()
    assert rejected == [("missing field(s) event_us, cents",)]

    # A late event (older than the account's newest) joins the windows it falls in and leaves
    # the account at its newest instant; sent twice, past JetStream's duplicate check, it
    # counts once.
    account, newest = int(expected["account_id"].iloc[0]), int(expected["event_us"].iloc[0])
    late = encode("late-1", account, newest - 60 * 10**6, 123)

    async def send_late():
        nc = await nats.connect(NATS_URL)
        for _ in range(2):
            await nc.jetstream().publish(settings.subject, late)
        await nc.close()
        return await consume(settings, store, idle_exit_s=1.5)

    after = asyncio.run(send_late())
    assert after.new_events == 1 and after.duplicates == 1
    now = online_values(store, [account])
    assert now["transactions_1h"][0] == expected["transactions_1h"].iloc[0] + 1
    assert now["spend_1h"][0] == pytest.approx(expected["spend_1h"].iloc[0] + 1.23)
    assert now["transactions_today"][0] == expected["transactions_today"].iloc[0] + 1


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.KEEL_EVENTS.keel-stream.1.4711.12.1767571200000000000.3",
        # The newer form, with a domain and an account hash, goes through nats-py.
        "$JS.ACK.hub.ACCHASH.KEEL_EVENTS.keel-stream.2.4711.13.1767571200000000000.0.rnd",
    ],
)
def test_the_stream_sequence_is_the_one_nats_reads_from_the_reply(reply):
    from nats.aio.msg import Msg

    from keel.streaming.consumer import stream_sequence

    msg = Msg(None, subject="keel.events.account", reply=reply, data=b"{}")
    assert stream_sequence(msg) == msg.metadata.sequence.stream == 4711
