"""The lake's weekly upkeep, a job and its schedule where the warehouse is a lake."""

import dagster as dg

from keel.lake_maintenance import FILE_GRACE, SNAPSHOT_RETENTION
from orchestration.pools import WAREHOUSE_POOL
from orchestration.resources import WarehouseResource


class LakeMaintenanceConfig(dg.Config):
    """How old snapshots and unneeded files must be to go (see keel.lake_maintenance)."""

    older_than: str = SNAPSHOT_RETENTION
    grace: str = FILE_GRACE
    dry_run: bool = False


# It writes the lake (new files, expired snapshots), so it waits for a warehouse slot.
@dg.op(pool=WAREHOUSE_POOL)
def maintain_lake(
    context: dg.OpExecutionContext, config: LakeMaintenanceConfig, warehouse: WarehouseResource
) -> dg.Output[dict]:
    """Flush inlined rows, expire snapshots, compact files, delete unneeded and orphaned files."""
    from keel.lake_maintenance import maintain

    with warehouse.connect() as connection:
        summary = maintain(connection, config.older_than, config.grace, dry_run=config.dry_run)
    numbers = summary.as_dict()
    context.log.info("lake maintenance: %s", numbers)
    metadata = {
        name: dg.MetadataValue.bool(value)
        if isinstance(value, bool)
        else dg.MetadataValue.int(value)
        for name, value in numbers.items()
    }
    return dg.Output(numbers, metadata=metadata)


@dg.job
def lake_maintenance() -> None:
    """Weekly upkeep of the lake: snapshots expired, small files merged, old files deleted."""
    maintain_lake()


# Sunday mornings, once the night's daily partition (02:00) is in.
lake_maintenance_schedule = dg.ScheduleDefinition(
    job=lake_maintenance, cron_schedule="0 5 * * 0", name="lake_maintenance_schedule"
)


def lake_definitions(warehouse: WarehouseResource) -> tuple[list, list]:
    """The job and its schedule for a warehouse that is a lake; none for a DuckDB file.

    Production's catalog is an ``EnvVar`` not read yet; being named, it counts as a lake.
    """
    if not warehouse.is_lake:
        return [], []
    return [lake_maintenance], [lake_maintenance_schedule]
