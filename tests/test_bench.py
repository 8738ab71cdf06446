"""Benchmarks fail loudly when the compared sides disagree."""

import pyarrow as pa
import pyarrow.feather as feather
import pytest

from bench.common import require_same_answers
from bench.pit_join import _same_rows


def test_a_disagreement_exits_non_zero_and_agreement_does_not(capsys):
    require_same_answers("demo", {"same_rows": True, "same_verdicts": True})
    with pytest.raises(SystemExit) as stopped:
        require_same_answers("demo", {"same_rows": True, "same_verdicts": False})
    assert stopped.value.code == 1
    assert "same_verdicts" in capsys.readouterr().err


def test_pit_join_rows_differing_in_one_value_are_not_the_same(tmp_path):
    table = pa.table(
        {
            "account_id": [2, 1, 3],
            "event_timestamp": pa.array([1, 2, 3], pa.timestamp("us", tz="UTC")),
            "spend_7d": [1.5, None, 3.0],
        }
    )
    shuffled = table.take([2, 0, 1])
    changed = table.set_column(2, "spend_7d", pa.array([1.5, None, 3.000001]))
    paths = {}
    for name, data in {"table": table, "shuffled": shuffled, "changed": changed}.items():
        paths[name] = str(tmp_path / f"{name}.arrow")
        feather.write_feather(data, paths[name])

    assert _same_rows(paths["table"], paths["shuffled"])  # row order and nulls do not matter
    assert not _same_rows(paths["table"], paths["changed"])
