"""The team profile's services for one test alone: databases, audit role, queues, Redis keys."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

from keel.settings import KeelPaths
from keel.team import services

PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
PARTS = ("dagster", "mlflow", "audit", "feast", "lake")


def delete_queues(prefix: str) -> None:
    """The broker queues a test's workers declared (they outlive the workers), with those of
    the scenario's own workers (`keel.team.play`)."""
    from kombu import Connection

    from orchestration.executors import QUEUES, broker_url

    with Connection(broker_url()) as connection:
        channel = connection.default_channel
        for middle in ("", f"scenario-{os.getpid()}-"):
            for queue in QUEUES:
                channel.queue_delete(f"{prefix}{middle}{queue}")


@contextlib.contextmanager
def team_world(paths: KeelPaths, monkeypatch, prefix: str, redis_db: int) -> Iterator[dict]:
    """Point the team profile's variables at databases, queues and a Redis database of this
    test's own (named ``prefix``); on exit stop what the test started and remove them all.

    Yields the databases' names by part (``dagster``, ``mlflow``, ``audit``, ``feast``, ``lake``).
    """
    import psycopg
    import redis

    unique = uuid.uuid4().hex[:8]
    names = {part: f"{prefix}_{part}_{unique}" for part in PARTS}
    queue_prefix = f"{prefix}-{unique}-"
    env = {
        "KEEL_PROFILE": "team",
        "KEEL_HOME": str(paths.home),
        "DAGSTER_HOME": str(paths.dagster_home),
        services.PG_URL_ENV: f"{PG_SERVER}/{names['dagster']}",
        services.MLFLOW_PG_URL_ENV: f"{PG_SERVER}/{names['mlflow']}",
        services.AUDIT_URI_ENV: f"postgresql://{names['audit']}@127.0.0.1:5432/{names['audit']}",
        services.FEAST_REGISTRY_ENV: (
            f"postgresql+psycopg://postgres@127.0.0.1:5432/{names['feast']}"
        ),
        services.FEAST_REDIS_ENV: f"127.0.0.1:6379,db={redis_db}",
        "KEEL_LAKE_CATALOG": f"{PG_SERVER}/{names['lake']}",
        "KEEL_CELERY_QUEUE_PREFIX": queue_prefix,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = redis.Redis(host="127.0.0.1", port=6379, db=redis_db)
    before = set(client.keys("*"))
    try:
        yield names
    finally:
        services.stop_all(paths)
        delete_queues(queue_prefix)
        added = set(client.keys("*")) - before
        if added:
            client.delete(*added)
        with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as connection:
            for name in names.values():
                connection.execute(f'drop database if exists "{name}" with (force)')
            connection.execute(f'drop role if exists "{names["audit"]}"')
