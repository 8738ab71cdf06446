"""Step executors per profile: the team profile runs every step as a Celery task on RabbitMQ.

Workers are separate processes (``keel workers start --queue default|gpu``), on this machine or
others, that listen on a queue of the broker. A step tagged ``gpu`` (the torch model) goes to
the ``gpu`` queue, every other step to ``default``; an explicit ``dagster-celery/queue`` op tag
wins. Tasks are acknowledged only once the step ends, so a worker that dies mid-step hands its
step back to the broker and another worker runs it again.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import dagster as dg
from dagster._core.execution.retries import RetryMode
from dagster._grpc.types import ExecuteStepArgs
from dagster._serdes import pack_value
from dagster_celery.executor import CELERY_CONFIG, CeleryExecutor
from dagster_celery.tags import DAGSTER_CELERY_QUEUE_TAG

BROKER_ENV = "KEEL_CELERY_BROKER"
# Several deployments (or tests) can share one broker: the prefix keeps their queues apart.
QUEUE_PREFIX_ENV = "KEEL_CELERY_QUEUE_PREFIX"
DEFAULT_BROKER = "pyamqp://guest:guest@127.0.0.1:5672//"
QUEUES = ("default", "gpu")
GPU_TAG = "gpu"
# A step waiting for a pool slot asks again after at most this many seconds (Dagster: 15).
POOL_CLAIM_MAX_WAIT_S = 2
# How often a run's orchestrating process looks for finished steps (dagster-celery: 1 s).
EXECUTION_TICK_S = 0.25


def broker_url() -> str:
    """The Celery broker: ``KEEL_CELERY_BROKER``, else RabbitMQ on this machine."""
    return os.environ.get(BROKER_ENV, "").strip() or DEFAULT_BROKER


def queue_name(queue: str) -> str:
    """The broker's name for one of Keel's queues (``default`` or ``gpu``)."""
    if queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}; Keel's queues are {', '.join(QUEUES)}")
    return os.environ.get(QUEUE_PREFIX_ENV, "").strip() + queue


def celery_settings() -> dict[str, Any]:
    """Broker, result backend and Celery settings shared by the executor and the workers."""
    return {
        "broker": broker_url(),
        "backend": "rpc://",
        "config_source": {
            # Acknowledge after the step: a worker killed mid-step returns its task to the queue.
            "task_acks_late": True,
            "task_reject_on_worker_lost": True,
            # One task per worker at a time, so a second idle worker takes the next step.
            "worker_prefetch_multiplier": 1,
            "task_default_queue": queue_name("default"),
        },
    }


def step_queue(tags: dict[str, Any]) -> str:
    """The queue of a step with these op tags."""
    if tags.get(DAGSTER_CELERY_QUEUE_TAG):
        return str(tags[DAGSTER_CELERY_QUEUE_TAG])
    return queue_name("gpu" if str(tags.get(GPU_TAG, "")).lower() == "true" else "default")


@functools.cache
def _execute_plan_task(app):
    """The step task, registered once per Celery app (the executor makes one app per run)."""
    from dagster_celery.tasks import create_task

    return create_task(app)


def _submit_step(app, plan_context, step, _queue, priority, known_state):
    args = ExecuteStepArgs(
        job_origin=plan_context.reconstructable_job.get_python_origin(),
        run_id=plan_context.dagster_run.run_id,
        step_keys_to_execute=[step.key],
        instance_ref=plan_context.instance.get_ref(),
        retry_mode=plan_context.executor.retries.for_inner_plan(),
        known_state=known_state,
        print_serialized_events=True,
    )
    queue = step_queue(dict(step.tags))
    return (
        _execute_plan_task(app)
        .si(
            execute_step_args_packed=pack_value(args),
            executable_dict=plan_context.reconstructable_job.to_dict(),
        )
        .apply_async(priority=priority, queue=queue, routing_key=f"{queue}.execute_plan")
    )


class KeelCeleryExecutor(CeleryExecutor):
    """dagster-celery's executor, routing each step to Keel's queue for it."""

    def execute(self, plan_context, execution_plan):
        from dagster._core.execution.plan import instance_concurrency_context
        from dagster_celery import core_execution_loop
        from dagster_celery.core_execution_loop import core_celery_execution_loop

        # A freed pool slot is kept for the step first in line until that step asks again, and
        # Dagster spaces a waiting step's asks out to 15 s: the one-slot dbt pool then idled
        # for seconds between a backfill's runs. A finished step frees its slot only once this
        # loop sees it, so it looks more often too. This process orchestrates this run alone.
        assert hasattr(instance_concurrency_context, "MAX_CONCURRENCY_CLAIM_BLOCKED_INTERVAL")
        assert hasattr(core_execution_loop, "TICK_SECONDS")
        instance_concurrency_context.MAX_CONCURRENCY_CLAIM_BLOCKED_INTERVAL = POOL_CLAIM_MAX_WAIT_S
        core_execution_loop.TICK_SECONDS = EXECUTION_TICK_S
        return core_celery_execution_loop(
            plan_context, execution_plan, step_execution_fn=_submit_step
        )


@dg.executor(
    name="keel_celery",
    config_schema=CELERY_CONFIG,
    requirements=dg.multiple_process_executor_requirements(),
)
def keel_celery_executor(init_context) -> KeelCeleryExecutor:
    """Every step a Celery task; the broker and queues of ``celery_settings`` unless configured."""
    config = {**celery_settings(), **{k: v for k, v in init_context.executor_config.items() if v}}
    return KeelCeleryExecutor(
        broker=config["broker"],
        backend=config["backend"],
        config_source=config["config_source"],
        include=config.get("include"),
        retries=RetryMode.from_config(config["retries"]),
    )


def production_executor() -> dg.ExecutorDefinition:
    """Each step its own Kubernetes pod, in the code location's image.

    A step's ``dagster-k8s/config`` op tag (the torch step's ``nvidia.com/gpu`` request) thus
    reaches its own pod, which a run-level launcher alone never gives it.
    """
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor.configured(
        {
            "job_image": {"env": "KEEL_IMAGE"},
            "job_namespace": {"env": "KEEL_K8S_NAMESPACE"},
            "service_account_name": {"env": "KEEL_K8S_SERVICE_ACCOUNT"},
            "load_incluster_config": True,
        },
        name="keel_k8s",
    )


def executor_for(profile: str) -> dg.ExecutorDefinition | None:
    """The profile's step executor (``None``: Dagster's default, one process per step)."""
    if profile == "team":
        return keel_celery_executor
    if profile == "production":
        return production_executor()
    return None
