import subprocess

from tests.conftest import REPO_ROOT


def test_ruff_is_clean(venv_bin):
    result = subprocess.run(
        [str(venv_bin / "ruff"), "check", "."], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout
