"""The dbt project as Dagster sees it; `keel prepare` parses its manifest.

Under `dagster dev` the manifest is parsed again when the definitions load, as dagster-dbt's
``prepare_if_dev`` does, but with the dbt executable of this environment: the same one the
``dbt`` resource runs, so `dagster dev -w workspace.yaml` works without the venv on PATH.
"""

import sys
from pathlib import Path

from dagster_dbt import DbtProject

from keel.settings import DBT_PROJECT_DIR, dbt_target_path

# The dbt of the environment that runs Keel, never whichever `dbt` PATH finds first.
DBT_EXECUTABLE = str(Path(sys.executable).with_name("dbt"))

dbt_project = DbtProject(
    project_dir=DBT_PROJECT_DIR, profiles_dir=DBT_PROJECT_DIR, target_path=dbt_target_path()
)


def prepare(project: DbtProject = dbt_project) -> Path:
    """Parse the dbt project into its manifest with ``DBT_EXECUTABLE``; returns the manifest."""
    from dagster_dbt import DbtCliResource
    from filelock import FileLock

    target = project.project_dir / project.target_path
    target.mkdir(parents=True, exist_ok=True)
    # `dagster dev` loads the definitions in several processes at once: one parse at a time.
    with FileLock(str(target / ".prepare.lock")):
        DbtCliResource(project_dir=project, dbt_executable=DBT_EXECUTABLE).cli(
            ["parse", "--quiet"], target_path=project.target_path
        ).wait()
    if not project.manifest_path.exists():
        raise FileNotFoundError(
            f"dbt parse wrote no manifest at {project.manifest_path}; see {target}/dbt.log"
        )
    return project.manifest_path


if dbt_project.preparer.using_dagster_dev():
    prepare()
