"""Run keel-edge in a fresh interpreter that can see only keel_edge and one site-packages.

The interpreter starts with ``-I`` (no environment variables, no user site, no current
folder); ``keel_edge`` is copied on its own into a scratch folder, so neither Keel nor
anything else from the project is importable through the path. This is how the bundle's cold
start is measured and how tests prove the runtime needs nothing but onnxruntime and NumPy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

EDGE_PACKAGE = Path(__file__).resolve().parent.parent.parent / "keel_edge"

# Keep the standard library; drop every site folder and the project's editable-install finder
# (which would otherwise make ``import keel`` work); then add keel_edge and one site-packages.
_PATH_PRELUDE = """
import sys, sysconfig
_std = {{sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib")}}
sys.path[:] = [p for p in sys.path if p in _std or p.endswith((".zip", "lib-dynload"))]
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in repr(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in repr(h)]
sys.path_importer_cache.clear()
sys.path.insert(0, {edge!r})
sys.path.append({packages!r} or sysconfig.get_paths()["purelib"])
"""

# The handler as the Lambda runtime calls it: an API Gateway proxy event, a context object.
_HANDLER_SCRIPT = """
import json, os, sys, time
started = time.perf_counter()
payload = json.loads(sys.stdin.read())
os.environ.update(payload["environment"])

class Context:
    aws_request_id = "isolated-run"
    function_name = "keel-edge"
    def get_remaining_time_in_millis(self):
        return 30_000

from keel_edge.serverless import handler
event = {"httpMethod": "POST", "path": "/score", "isBase64Encoded": False,
         "headers": {"content-type": "application/json"},
         "body": json.dumps({"rows": payload["rows"]})}
response = handler(event, Context())
wall = time.perf_counter() - started
heavy = sorted(m for m in ("keel", "pandas", "torch", "lightgbm", "sklearn") if m in sys.modules)
print(json.dumps({"response": response, "wall_s": wall, "heavy_modules": heavy,
                  "sys_path": sys.path}))
"""


def site_packages() -> str:
    """This interpreter's site-packages (the project's virtual environment)."""
    return sysconfig.get_paths()["purelib"]


def run_isolated(
    script: str,
    stdin: str = "",
    *,
    python: str = sys.executable,
    packages: str = "",
    timeout_s: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with ``python -I`` and a sys.path of keel_edge, the stdlib and ``packages``.

    Args:
        script: Python source to run.
        stdin: Text fed to the script.
        python: The interpreter (another virtual environment's, for a clean-room run).
        packages: The site-packages folder to expose; empty means ``python``'s own.
        timeout_s: Wall-clock limit.
    """
    with tempfile.TemporaryDirectory(prefix="keel-edge-path-") as scratch:
        shutil.copytree(EDGE_PACKAGE, Path(scratch) / "keel_edge", ignore=_no_caches)
        prelude = _PATH_PRELUDE.format(edge=scratch, packages=packages)
        return subprocess.run(
            [python, "-I", "-c", prelude + script],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )


def _no_caches(folder: str, names: list[str]) -> list[str]:
    return [name for name in names if name == "__pycache__"]


def invoke_handler(
    bundle: str | Path,
    rows: Sequence[Mapping[str, Any]],
    *,
    variant: str = "",
    manifest_sha256: str = "",
    python: str = sys.executable,
    packages: str = "",
) -> dict[str, Any]:
    """One cold invocation of the serverless handler in a fresh, isolated interpreter.

    Returns the handler's response, the process's wall time, the heavy modules it imported
    (there must be none) and its sys.path.
    """
    payload = {
        "rows": list(rows),
        "environment": {
            "KEEL_BUNDLE_DIR": str(bundle),
            "KEEL_BUNDLE_VARIANT": variant,
            "KEEL_BUNDLE_SHA256": manifest_sha256,
        },
    }
    done = run_isolated(
        _HANDLER_SCRIPT, json.dumps(payload, default=str), python=python, packages=packages
    )
    if done.returncode != 0:
        raise RuntimeError(f"the isolated handler failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
