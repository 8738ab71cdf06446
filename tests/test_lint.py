import subprocess

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]])
def test_ruff_is_clean(venv_bin, command):
    result = subprocess.run(
        [str(venv_bin / "ruff"), *command], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
