"""Online features for serving: the fast online lookup, plus each entity's feature event time.

The prediction cache and the feature-age metric need the event time of the values served.
`ServingFeatureReader` reads it in the same round trip as the values: on Redis Feast's
``_ts:<view>`` field joins the one ``HMGET``; on SQLite the entity row's ``event_us`` column
comes with its JSON. Values are exactly what ``OnlineFeatureReader.get`` returns
(and so what ``get_online_features`` returns); the tests hold both readers to that.

A store that cannot be reached raises `FeatureStoreUnavailable`; the app answers 503.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from keel.mirrors.feast_online_reader import (
    _NOTHING,
    OnlineFeatureReader,
    _decode,
    _decode_column,
)

if TYPE_CHECKING:
    from feast import FeatureStore

_EVENT_US = "__keel_event_us"
# Longest wait on the online store before a request gets 503 (unless the store's own
# connection settings say otherwise).
STORE_TIMEOUT_S = 1.0


class FeatureStoreUnavailable(RuntimeError):
    """The online store did not answer (Redis down, SQLite file missing or locked)."""


@dataclass(frozen=True)
class OnlineRows:
    """Features of a batch of entities, column by column, with what serving needs besides."""

    columns: dict[str, list[Any]]  # feature name -> values, in request order
    event_us: list[int | None]  # feature event time per entity, microseconds since 1970 (UTC)
    known: list[bool]  # False where the store holds no value of any stored feature


class ServingFeatureReader(OnlineFeatureReader):
    """`OnlineFeatureReader` that also returns each entity's feature event time.

    With several feature views the event time is the newest of them (the key of the
    prediction cache changes whenever any view's values are replaced, as they only move
    forward in time).
    """

    def __init__(self, store: FeatureStore, feature_service: str) -> None:
        super().__init__(store, feature_service)
        self.stored_features = [f for view in self._views for f in view.features]
        if getattr(self, "_redis", None) is not None:
            self._ts_fields = [f"_ts:{view.name}".encode() for view in self._views]
            self._read = self._read_redis_timed
            _fail_fast(self._redis)
            self._own = _OwnConnection(self._redis)
        else:
            self._read = self._read_sqlite_timed
        import redis

        self._unavailable: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            sqlite3.OperationalError,
        )

    def _read_redis_timed(self, keys: list[bytes]) -> dict[str, list[Any]]:
        from google.protobuf.timestamp_pb2 import Timestamp

        fields = self._redis_fields + self._ts_fields
        project, fallback = self._project, self._fallback
        if len(keys) == 1:
            replies = [self._own.command("HMGET", keys[0] + project, *fields)]
        else:
            replies = self._hmget_all(keys=[key + project for key in keys], args=fields)
        if len(replies) == 1:  # one entity: numpy per column costs more than it saves
            (reply,) = replies
            columns = {
                name: [_decode(reply[position], fallback)]
                for position, name in enumerate(self.stored_features)
            }
        else:
            columns = {
                name: _decode_column([reply[position] for reply in replies], fallback)
                for position, name in enumerate(self.stored_features)
            }
        first_ts = len(self._redis_fields)
        event_us: list[int | None] = []
        for reply in replies:
            newest = None
            for raw in reply[first_ts:]:
                if raw:
                    stamp = Timestamp.FromString(raw)
                    micros = stamp.seconds * 1_000_000 + stamp.nanos // 1_000
                    newest = micros if newest is None else max(newest, micros)
            event_us.append(newest)
        columns[_EVENT_US] = event_us
        return columns

    def _read_sqlite_timed(self, keys: list[bytes]) -> dict[str, list[Any]]:
        columns: dict[str, list[Any]] = {}
        newest: dict[bytes, int] = {}
        loads = json.loads
        for view in self._views:
            wanted = set(view.features)
            found: dict[bytes, dict[str, Any]] = {}
            if view.entity_table:
                rows = self._sqlite.execute(
                    f'SELECT entity_key, event_us, features FROM "{view.entity_table}" '
                    f"WHERE entity_key IN ({','.join('?' * len(keys))})",
                    keys,
                )
                for key, event_us, text in rows:
                    values = loads(text) if text is not None else {}
                    if values.keys() >= wanted:
                        found[key] = values
                        if event_us is not None:
                            newest[key] = max(newest.get(key, event_us), event_us)
            pending = [key for key in keys if key not in found]
            if pending:
                # Feast's own rows (no entity row): values are right, the time is not read.
                found.update(self._read_feature_rows(view, pending))
            aligned = [found.get(key, _NOTHING) for key in keys]
            for feature in view.features:
                columns[feature] = [values.get(feature) for values in aligned]
        columns[_EVENT_US] = [newest.get(key) for key in keys]
        return columns

    def read(self, entity_ids: Sequence[int]) -> OnlineRows:
        """The feature service's values for ``entity_ids`` with event times and known flags."""
        try:
            result = self.get(entity_ids)
        except self._unavailable as error:
            raise FeatureStoreUnavailable(f"{type(error).__name__}: {error}") from error
        event_us = result.pop(_EVENT_US)
        result.pop(self.join_key)
        stored = [result[name] for name in self.stored_features]
        known = [any(column[i] is not None for column in stored) for i in range(len(event_us))]
        return OnlineRows(columns=result, event_us=event_us, known=known)

    def ping(self) -> None:
        """Raise `FeatureStoreUnavailable` unless the online store answers."""
        try:
            if getattr(self, "_redis", None) is not None:
                self._redis.ping()
            else:
                self._sqlite.execute("SELECT 1").fetchone()
        except self._unavailable as error:
            raise FeatureStoreUnavailable(f"{type(error).__name__}: {error}") from error


class _OwnConnection:
    """One Redis connection of the reader's own, used without redis-py's pool.

    Through the pool a command also pays a checkout, a poll of the socket for stray data, a
    return and their metrics, which together cost more than the command. The connection has the
    pool's settings (`_fail_fast`'s timeouts) and the same policy: one immediate retry on a
    fresh connection when it drops, then the error.
    """

    def __init__(self, client: Any) -> None:
        import redis

        pool = client.connection_pool
        self._connection = pool.connection_class(**pool.connection_kwargs)
        self._lock = threading.Lock()
        self._dropped = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

    def command(self, *args: Any) -> Any:
        with self._lock:
            try:
                return self._send(args)
            except self._dropped:
                return self._send(args)

    def _send(self, args: tuple[Any, ...]) -> Any:
        connection = self._connection
        try:
            connection.send_command(*args)
            return connection.read_response()
        except BaseException:
            connection.disconnect()  # a reply may still be on its way: never reuse the socket
            raise


def _fail_fast(client: Any) -> None:
    """A request must not wait on a dead Redis: redis-py's default retries take 12 s."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client.set_retry(Retry(NoBackoff(), 1))  # one immediate retry for a dropped connection
    settings = client.connection_pool.connection_kwargs
    for name, seconds in (
        ("socket_connect_timeout", STORE_TIMEOUT_S),
        ("socket_timeout", STORE_TIMEOUT_S),
    ):
        if settings.get(name) is None:
            settings[name] = seconds


def open_reader(
    feast_config: str, overrides: dict[str, Any], feature_service: str
) -> ServingFeatureReader:
    """A reader over the Keel feature repo under ``feast_config`` (plus ``overrides``)."""
    from keel import features

    store = features.open_store(feast_config, overrides=overrides or None)
    return ServingFeatureReader(store, feature_service)
