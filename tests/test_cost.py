"""Cost per step, run, asset, day and model version, measured from the step's process."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
from click.testing import CliRunner

from keel.cost import measure
from keel.cost.dagster import HANDLER_CONFIG, cost_observations
from keel.cost.prices import DEFAULT_PRICES, PriceError, cost, price_table, resume_savings
from keel.cost.store import CostError, CostStore, parse_since
from keel.settings import PROFILES

MB = 2**20


def _burn(size: int) -> int:
    """CPU work proportional to ``size``."""
    total = 0
    for i in range(size * 3_000_000):
        total += i * i % 7
    return total


@dg.asset(config_schema={"size": int})
def sized_work(context) -> dg.MaterializeResult:
    """Work, memory and bytes written in proportion to its size."""
    size = context.op_config["size"]
    held = bytearray(size * 40 * MB)  # touched, so it is resident
    held[::4096] = b"x" * len(held[::4096])
    target = context.instance.root_directory
    with open(f"{target}/out-{context.run_id}.bin", "wb") as out:
        out.write(bytes(size * 5 * MB))
    return dg.MaterializeResult(metadata={"checksum": _burn(size) + len(held)})


@dg.asset(deps=[sized_work])
def failing_step() -> None:
    """Fails after using a little CPU."""
    _burn(1)
    raise RuntimeError("boom")


def _run(instance, size: int, *assets) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [sized_work, *assets],
        instance=instance,
        run_config={"ops": {"sized_work": {"config": {"size": size}}}},
        raise_on_error=False,
    )


def _sensor_context(instance, keel_home):
    from keel.registry_types import RegistryConfig
    from orchestration.resources import MlflowResource

    config = RegistryConfig.local(keel_home)
    mlflow = MlflowResource(
        tracking_uri=config.tracking_uri,
        registry_uri=config.registry_uri,
        artifact_location=str(keel_home.mlflow / "artifacts"),
        lock_file=config.lock_file,
    )
    return dg.build_sensor_context(instance=instance, resources={"mlflow": mlflow})


def test_two_runs_of_different_sizes_cost_in_proportion_to_their_measured_resources(keel_home):
    with dg.instance_for_test(overrides=HANDLER_CONFIG) as instance:
        small, large = _run(instance, 1), _run(instance, 4)
        assert small.success and large.success
        store = CostStore()
        rows = {row["run_id"]: row for row in store.rows()}
        first, second = rows[small.run_id], rows[large.run_id]
        prices = DEFAULT_PRICES["local"]
        for row in (first, second):
            assert row["assets"] == ["sized_work"] and row["status"] == "success"
            usage = measure.Usage(
                **{k: row[k] for k in ("wall_s", "cpu_s", "peak_memory_bytes", "gpu_s")},
                bytes_written=row["bytes_written"],
                peak_scope=row["peak_scope"],
            )
            assert row["cost"] == pytest.approx(cost(usage, prices)["total"], rel=1e-9)
            assert row["cost_cpu"] == pytest.approx(row["cpu_s"] / 3600 * prices.cpu_hour)
        # Four times the work: about four times the CPU, memory and bytes, and the money. The
        # same work's CPU seconds swell when the machine's other core is busy (7.2x seen under
        # load), so the bounds say "in proportion", not "exactly four".
        cpu_ratio = second["cpu_s"] / first["cpu_s"]
        assert 2.0 < cpu_ratio < 8
        assert second["bytes_written"] >= 20 * MB > first["bytes_written"] >= 5 * MB
        assert second["peak_memory_bytes"] > first["peak_memory_bytes"] + 80 * MB
        assert first["peak_scope"] == "step" and first["gpu_s"] == 0.0
        assert second["cost_cpu"] / first["cost_cpu"] == pytest.approx(cpu_ratio)
        assert 2.0 < second["cost"] / first["cost"] < 8
        by_run = store.by_run()
        assert by_run[large.run_id].cost == pytest.approx(second["cost"])

        # The observation sensor puts the cost in the asset's metadata.
        result = cost_observations(_sensor_context(instance, keel_home))
        observed = [e.metadata["cost"].value for e in result.asset_events]
        assert observed == pytest.approx([first["cost"], second["cost"]])


_CHILD = """
import sys, time
seconds, megabytes, path = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
held = bytearray(megabytes * 2**20)
held[::4096] = b"x" * len(held[::4096])  # touched, so it is resident
with open(path, "wb") as out:
    out.write(bytes(20 * 2**20))
end = time.process_time() + seconds
while time.process_time() < end:
    pass
time.sleep(0.6)  # held long enough to be sampled
"""


@dg.asset(config_schema={"seconds": float, "megabytes": int})
def runs_a_child(context) -> dg.MaterializeResult:
    """A step whose work happens in a subprocess, as dbt's does: the parent only waits."""
    import os
    import resource
    import subprocess
    import sys

    config = context.op_config
    own = resource.getrusage(resource.RUSAGE_SELF)
    target = f"{context.instance.root_directory}/child-{context.run_id}.bin"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(config["seconds"]), str(config["megabytes"]), target]
    )
    _, exit_status, usage = os.wait4(child.pid, 0)  # the child's own usage, as the kernel kept it
    child.returncode = os.waitstatus_to_exitcode(exit_status)
    assert child.returncode == 0
    after = resource.getrusage(resource.RUSAGE_SELF)
    status = Path("/proc/self/status").read_text().splitlines()
    rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    return dg.MaterializeResult(
        metadata={
            "parent_rss_bytes": rss,
            "child_cpu_s": usage.ru_utime + usage.ru_stime,
            "child_peak_bytes": usage.ru_maxrss * 1024,
            "parent_cpu_s": (after.ru_utime + after.ru_stime) - (own.ru_utime + own.ru_stime),
        }
    )


def test_a_step_that_works_in_a_subprocess_is_costed_with_its_child(keel_home):
    def run(instance, seconds: float, megabytes: int):
        result = dg.materialize(
            [runs_a_child],
            instance=instance,
            run_config={
                "ops": {"runs_a_child": {"config": {"seconds": seconds, "megabytes": megabytes}}}
            },
        )
        measured = result.asset_materializations_for_node("runs_a_child")[0].metadata
        row = next(r for r in CostStore().rows() if r["run_id"] == result.run_id)
        return {name: value.value for name, value in measured.items()}, row

    with dg.instance_for_test(overrides=HANDLER_CONFIG) as instance:
        _, light_row = run(instance, 0.3, 10)
        heavy, heavy_row = run(instance, 1.5, 300)
    # The parent barely worked: the step's CPU is its child's, as the kernel counted it.
    assert heavy["parent_cpu_s"] < 0.5 < 1.4 < heavy["child_cpu_s"]
    assert heavy["child_cpu_s"] <= heavy_row["cpu_s"] < heavy["child_cpu_s"] + 1.0
    assert heavy_row["cpu_s"] - light_row["cpu_s"] > 1.0
    # The child's 20 MB written and its 300 MB resident count with the step.
    assert heavy_row["bytes_written"] >= 20 * MB and light_row["bytes_written"] >= 20 * MB
    # The child's peak counts with the step: the heavy child's 300 MB over the light one's 10
    # shows in the steps' peaks (the parent's own resident set is alike in both runs; in a long
    # test session it is large and moves, so it is not compared).
    assert heavy["child_peak_bytes"] > 300 * MB
    assert heavy_row["peak_memory_bytes"] >= heavy["child_peak_bytes"]
    assert heavy_row["peak_memory_bytes"] - light_row["peak_memory_bytes"] > 150 * MB
    assert heavy_row["cost"] > light_row["cost"]


def test_gpu_seconds_are_wall_time_per_device_used_and_none_without_cuda():
    # Recorded peaks per device: one device used bills the wall time, two bill it twice.
    assert measure.gpu_seconds(12.5, [0, 3 * MB]) == 12.5
    assert measure.gpu_seconds(12.5, [MB, 3 * MB]) == 25.0
    assert measure.gpu_seconds(12.5, [0, 0]) == 0.0
    assert measure.gpu_seconds(12.5, []) == 0.0  # no CUDA: a CPU machine records none
    # Children's high-water mark tells about the step only when it rose during it.
    assert measure.children_peak(0, 500 * MB, 500 * MB) == 0
    assert measure.children_peak(0, 500 * MB, 700 * MB) == 700 * MB
    assert measure.children_peak(900 * MB, 500 * MB, 700 * MB) == 900 * MB


def test_a_failed_step_is_costed_and_totals_per_asset_and_day(keel_home):
    with dg.instance_for_test(overrides=HANDLER_CONFIG) as instance:
        result = _run(instance, 1, failing_step)
        assert not result.success
    store = CostStore()
    rows = store.rows()
    assert {(r["step_key"], r["status"]) for r in rows} == {
        ("sized_work", "success"),
        ("failing_step", "failure"),
    }
    failed = next(r for r in rows if r["status"] == "failure")
    assert failed["assets"] == [] and failed["cpu_s"] > 0 and failed["cost"] > 0
    by_asset = store.by_asset()
    assert set(by_asset) == {"sized_work", "failing_step"}
    today = datetime.now(UTC).date().isoformat()
    assert store.by_day()[today].cost == pytest.approx(sum(r["cost"] for r in rows))
    assert store.by_day(since=datetime.now(UTC) + timedelta(days=1)) == {}


def test_price_tables_resume_savings_and_since(tmp_path, monkeypatch):
    assert price_table("production").gpu_hour > 0
    prices = tmp_path / "prices.json"
    prices.write_text(
        json.dumps(
            {"local": {"cpu_hour": 1.0, "memory_gb_hour": 0.0, "gpu_hour": 10.0, "written_gb": 0.0}}
        )
    )
    monkeypatch.setenv("KEEL_PRICES", str(prices))
    table = price_table("local")
    usage = measure.Usage(3600.0, 1800.0, 2**30, 360.0, 0, "step")
    assert cost(usage, table)["total"] == pytest.approx(0.5 + 1.0)
    with pytest.raises(PriceError, match="production"):
        price_table("production")
    prices.write_text(json.dumps({"local": {"cpu_hours": 1.0}}))
    with pytest.raises(PriceError, match="unknown price keys"):
        price_table("local")
    prices.write_text(
        json.dumps(
            {"local": {"cpu_hour": "1.0", "memory_gb_hour": 0, "gpu_hour": 1, "written_gb": 0}}
        )
    )
    with pytest.raises(PriceError, match=r"local.cpu_hour must be a number >= 0, not '1.0'"):
        price_table("local")
    # Resumed at epoch 6 of 10: four epochs ran for 8.0, so six skipped epochs saved 12.0.
    assert resume_savings(8.0, 100.0, 6, 10) == pytest.approx(12.0)
    assert resume_savings(8.0, 100.0, 6, 10, mean_epoch_seconds=10.0) == pytest.approx(4.8)
    assert resume_savings(8.0, 100.0, 0, 10) == 0.0
    now = datetime(2026, 12, 1, tzinfo=UTC)
    assert parse_since("30d", now) == now - timedelta(days=30)
    assert parse_since("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=UTC)
    with pytest.raises(CostError, match="30d"):
        parse_since("a month", now)


@dg.asset(config_schema={"run_id": str, "resumed_from_epoch": int})
def trained_model(context) -> dg.MaterializeResult:
    """A training step as the training asset reports it: its MLflow run, epochs and resume."""
    _burn(1)
    config = context.op_config
    return dg.MaterializeResult(
        metadata={
            "run_id": config["run_id"],
            "epochs_run": 10,
            "resumed_from_epoch": config["resumed_from_epoch"],
        }
    )


@dg.asset(config_schema={"run_ids": dict})
def trained_families(context) -> dg.MaterializeResult:
    """A dataset folder's model step: one MLflow run per family, as ``run_ids``."""
    _burn(1)
    return dg.MaterializeResult(metadata={"run_ids": context.op_config["run_ids"]})


def test_a_model_version_costs_the_runs_of_its_lineage_and_keel_cost_shows_it(
    keel_home, monkeypatch
):
    import mlflow
    from mlflow import MlflowClient

    from keel import cli as keel_cli
    from keel.registry_types import RegistryConfig

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # earlier tests export them
        monkeypatch.delenv(name, raising=False)
    config = RegistryConfig.local(keel_home)
    client = MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.registry_uri)
    experiment = client.create_experiment("cost", artifact_location=str(keel_home.mlflow / "a"))
    runs = [client.create_run(experiment).info.run_id for _ in range(2)]
    client.create_registered_model(config.model_name)
    for run_id in runs:
        client.create_model_version(config.model_name, f"runs:/{run_id}/model", run_id=run_id)
    # A dataset folder's own model, trained in a step that logs one run per family.
    lightgbm, torch = (client.create_run(experiment).info.run_id for _ in range(2))
    client.create_registered_model("cards-risk")
    client.create_model_version("cards-risk", f"runs:/{torch}/model", run_id=torch)
    mlflow.set_tracking_uri(None)

    def train(instance, run_id: str, resumed: int, tags: dict | None = None):
        return dg.materialize(
            [trained_model],
            instance=instance,
            run_config={
                "ops": {
                    "trained_model": {"config": {"run_id": run_id, "resumed_from_epoch": resumed}}
                }
            },
            tags=tags,
        )

    with dg.instance_for_test(overrides=HANDLER_CONFIG) as instance:
        first = train(instance, "interrupted", 0)
        # A retry of the first run (same root) resumed at epoch 6 and logged version 1's run.
        retry = train(instance, runs[0], 6, {"dagster/root_run_id": first.run_id})
        other = train(instance, runs[1], 0)
        families = dg.materialize(
            [trained_families],
            instance=instance,
            run_config={
                "ops": {
                    "trained_families": {
                        "config": {"run_ids": {"lightgbm": lightgbm, "torch": torch}}
                    }
                }
            },
        )
        # The sensor puts each version's lineage cost on the version itself.
        cost_observations(_sensor_context(instance, keel_home))
    store = CostStore()
    rows = {row["run_id"]: row for row in store.rows()}
    tags = client.get_model_version(config.model_name, "1").tags
    v1_cost = rows[first.run_id]["cost"] + rows[retry.run_id]["cost"]
    assert float(tags["keel.cost"]) == pytest.approx(v1_cost, rel=1e-5)
    assert tags["keel.cost_currency"] == "USD"
    assert rows[retry.run_id]["saved"] == pytest.approx(rows[retry.run_id]["cost"] * 6 / 4)
    assert rows[other.run_id]["saved"] == 0.0
    folder_step = rows.pop(families.run_id)
    assert folder_step["mlflow_run_id"] == f"{lightgbm},{torch}"
    folder_tags = client.get_model_version("cards-risk", "1").tags
    assert float(folder_tags["keel.cost"]) == pytest.approx(folder_step["cost"], rel=1e-5)
    models = store.by_model({"v1": [runs[0]], "v2": [runs[1]], "v3": ["never-trained"]})
    assert models["v1"].steps == 2
    assert models["v1"].cost == pytest.approx(
        rows[first.run_id]["cost"] + rows[retry.run_id]["cost"]
    )
    assert (
        models["v2"].cost == pytest.approx(rows[other.run_id]["cost"]) and models["v3"].steps == 0
    )

    shown = CliRunner().invoke(keel_cli.cli, ["cost", "--since", "30d", "--json"])
    assert shown.exit_code == 0, shown.output
    totals = json.loads(shown.output)
    assert totals["model"][f"{config.model_name} v1"]["cost"] == pytest.approx(models["v1"].cost)
    # Every registered model's versions, a dataset folder's too.
    assert totals["model"]["cards-risk v1"]["cost"] == pytest.approx(folder_step["cost"])
    assert totals["asset"]["trained_model"]["steps"] == 3
    assert sum(day["cost"] for day in totals["day"].values()) == pytest.approx(
        sum(row["cost"] for row in rows.values()) + folder_step["cost"]
    )
    text = CliRunner().invoke(keel_cli.cli, ["cost", "--by", "run"])
    assert text.exit_code == 0 and first.run_id[:36] in text.output and "per run" in text.output
    wrong = CliRunner().invoke(keel_cli.cli, ["cost", "--since", "lately"])
    assert wrong.exit_code == 2 and "30d" in wrong.output


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_instance_attaches_the_step_cost_handler_and_has_prices(profile):
    import yaml

    from keel.settings import DAGSTER_CONFIG_DIR

    config = yaml.safe_load((DAGSTER_CONFIG_DIR / f"{profile}.yaml").read_text())
    assert config["python_logs"] == HANDLER_CONFIG["python_logs"]
    # The handler prices every step with the profile's table: without one no step is costed.
    usage = measure.Usage(3600.0, 3600.0, 0, 0.0, 0, "step")
    assert cost(usage, price_table(profile))["total"] > 0


def test_the_definitions_run_the_cost_observation_sensor():
    from orchestration.definitions import defs

    assert defs.resolve_sensor_def("cost_observations") is cost_observations
