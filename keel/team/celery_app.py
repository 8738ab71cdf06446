"""The Celery app Keel's workers run (``celery -A keel.team.celery_app worker``).

It is dagster-celery's app with the broker and settings of the team executor, so that the
workers consume exactly what the executor sends.
"""

from dagster_celery.executor import CeleryExecutor
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task

from orchestration.executors import celery_settings

app = make_app(CeleryExecutor.for_cli(**celery_settings()).app_args())
execute_plan = create_task(app)
