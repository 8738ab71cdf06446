"""The concurrency pools of the steps that write the warehouse, and their limits per profile.

A DuckDB file (the local profile) takes one writing process at a time, so there every warehouse
writer, dbt included, shares the ``warehouse`` pool and the instance's ``default_limit: 1``.
A DuckLake (team, production) commits writers of different tables and partitions side by side
(keel.lake), so its raw loads and validations get several slots, while dbt gets a pool of its
own with one slot: dbt's lake run is single-threaded, and two builds of the same models would
replace the same tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from keel.settings import active_profile

if TYPE_CHECKING:
    import dagster as dg

WAREHOUSE_POOL = "warehouse"
DBT_POOL = "dbt"
# An instance yaml holds one default limit for every pool; these are set in the instance's
# storage instead (as `dagster instance concurrency set` does). Pools not named keep the default.
POOL_LIMITS: dict[str, dict[str, int]] = {
    "team": {WAREHOUSE_POOL: 4, DBT_POOL: 1},
}


def dbt_pool(profile: str | None = None) -> str:
    """The pool of dbt's steps: the warehouse's on a DuckDB file, one of their own on a lake."""
    return WAREHOUSE_POOL if (profile or active_profile()) == "local" else DBT_POOL


def set_pool_limits(instance: dg.DagsterInstance, profile: str) -> dict[str, int]:
    """Give ``instance`` the profile's pool limits; a pool already set by hand keeps its limit.

    Returns the limits the instance has for the profile's pools afterwards.
    """
    storage = instance.event_log_storage
    limits = {}
    for pool, limit in POOL_LIMITS.get(profile, {}).items():
        info = storage.get_concurrency_info(pool)
        if info.using_default_limit:
            storage.set_concurrency_slots(pool, limit)
            limits[pool] = limit
        else:
            limits[pool] = info.limit
    return limits
