import os

import pytest

from orchestration.profiles import dbt_resource
from orchestration.resources import WarehouseResource


@pytest.mark.slow
def test_dbt_works_on_the_warehouse_resource_it_is_given_without_touching_the_environment(
    keel_home, tmp_path
):
    """The warehouse's path reaches dbt in the invocation itself: a warehouse outside
    KEEL_HOME is the one dbt opens, and the process environment is the same afterwards."""
    elsewhere = tmp_path / "elsewhere" / "warehouse.duckdb"
    elsewhere.parent.mkdir()
    warehouse = WarehouseResource(database=str(elsewhere), marts_dir=str(tmp_path / "marts"))
    before = dict(os.environ)

    # `dbt debug` opens the profile's database: DuckDB creates the file it names.
    invocation = dbt_resource().cli_on(warehouse, ["debug"], raise_on_error=False)
    invocation.wait()

    assert dict(os.environ) == before
    assert invocation.is_successful(), invocation.target_path / "dbt.log"
    assert elsewhere.is_file()
    assert not keel_home.warehouse.exists()
