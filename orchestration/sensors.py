"""Sensors: external events that start runs (new landing files, drift, failures)."""

import json
from pathlib import Path

import dagster as dg

from assets.ingestion import LANDING_PARTITIONS, LANDING_SUFFIXES, raw_landed_activity
from orchestration.resources import SourcesResource


def landing_files(folder: Path) -> dict[str, str]:
    """Files ready in the landing folder, each with a signature that changes when it is rewritten.

    Hidden files are writers' temporary files (written, then renamed into place), so they are
    never picked up half-written.
    """
    if not folder.exists():
        return {}
    return {
        path.name: f"{path.stat().st_mtime_ns}:{path.stat().st_size}"
        for path in sorted(folder.iterdir())
        if path.is_file() and path.suffix in LANDING_SUFFIXES and not path.name.startswith(".")
    }


@dg.sensor(
    asset_selection=[raw_landed_activity],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Loads each new file in the landing folder exactly once.",
)
def landing_file_sensor(context: dg.SensorEvaluationContext, sources: SourcesResource):
    """One run per new or rewritten landing file; the cursor remembers what was loaded."""
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    current = landing_files(Path(sources.landing_dir))
    fresh = {name: signature for name, signature in current.items() if seen.get(name) != signature}
    if not fresh:
        return dg.SkipReason(f"no new files among {len(current)} in {sources.landing_dir}")
    known = set(context.instance.get_dynamic_partitions(LANDING_PARTITIONS.name))
    return dg.SensorResult(
        run_requests=[
            # The run key makes a re-evaluated tick (after a crash before the cursor was saved)
            # a no-op: Dagster never launches two runs with the same key.
            dg.RunRequest(run_key=f"{name}@{signature}", partition_key=name)
            for name, signature in fresh.items()
        ],
        dynamic_partitions_requests=[
            LANDING_PARTITIONS.build_add_request(sorted(set(fresh) - known))
        ],
        cursor=json.dumps({**seen, **fresh}, sort_keys=True),
    )
