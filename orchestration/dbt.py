"""The dbt project as Dagster sees it; the manifest is parsed by `keel prepare`, never at import."""

from dagster_dbt import DbtProject

from keel.settings import DBT_PROJECT_DIR

dbt_project = DbtProject(project_dir=DBT_PROJECT_DIR, profiles_dir=DBT_PROJECT_DIR)
dbt_project.prepare_if_dev()
