"""The sensor that feeds the Evidently dashboards with each new monitoring report.

Drift and performance reports, a dataset folder's load drift and scores, and the RAG
monitoring: a project per dataset (the asset key's prefix), ``rag`` for the RAG service.
"""

import json

import dagster as dg

from orchestration.resources import ArtefactStore


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Adds each new drift, performance, scores and RAG monitoring report to the Evidently "
        "dashboards (a project per dataset)."
    ),
)
def monitoring_dashboards(context: dg.SensorEvaluationContext, artefacts: ArtefactStore):
    """Feed the Evidently workspace (a project per dataset) from the reports' metadata."""
    from keel.dashboards import feed_workspace, reports_from_instance, workspace_dir

    root = artefacts.path()
    if root.protocol not in ("", "file", "local"):
        return dg.SkipReason(
            f"the Evidently workspace is a local folder; the artefact store is {root}"
        )
    cursor = json.loads(context.cursor) if context.cursor else {}
    batch = reports_from_instance(context.instance, cursor.get("storage_id"))
    for problem in batch.problems:
        context.log.warning(f"not on the dashboards: {problem}")
    if batch.cursor == cursor.get("storage_id"):
        return dg.SkipReason("no new monitoring reports since the last tick")
    summary = feed_workspace(workspace_dir(root.path), batch.reports)
    note = (
        f"{summary.added} snapshots added, {summary.replaced} replaced, "
        f"{summary.unchanged} unchanged in {', '.join(sorted(summary.projects)) or 'no project'}"
    )
    return dg.SensorResult(skip_reason=note, cursor=json.dumps({"storage_id": batch.cursor}))


DASHBOARD_SENSORS = [monitoring_dashboards]
