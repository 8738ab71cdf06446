"""The shape of the code base: module sizes, imports, where settings and mirrors live.

Every check reads the source (AST or text) and names the offending file and line, so they run in
well under a second and say exactly what to fix.
"""

import ast
import functools
import importlib.metadata
import re
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = ("keel", "assets", "orchestration", "feature_repo")
MAX_MODULE_LINES = 700


def python_files(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (REPO_ROOT / package).rglob("*.py"))


@functools.cache
def parsed(path: Path) -> ast.Module:
    """A module's syntax tree, parsed once for all the checks here."""
    return ast.parse(path.read_text())


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(tree: ast.Module) -> set[str]:
    """Absolute module names imported anywhere in the module, ``if TYPE_CHECKING`` blocks aside."""
    type_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_no_module_passes_the_line_limit():
    too_long = {
        str(path.relative_to(REPO_ROOT)): lines
        for path in python_files(*PACKAGES)
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not too_long, f"split these along their sections (limit {MAX_MODULE_LINES}): {too_long}"


def test_keel_modules_import_each_other_without_a_cycle():
    """Function-level imports count too: a lazy import back is still a cycle in the design."""
    paths = {module_name(path): path for path in python_files("keel")}
    graph = {
        name: (runtime_imports(parsed(path)) & paths.keys()) - {name}
        for name, path in paths.items()
    }
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycle = [*trail[trail.index(target) :], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*trail, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


# -- re-implementations of dependency internals --------------------------------------------------

MIRRORS = REPO_ROOT / "keel" / "mirrors"


def pinned_versions() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.split(";")[0].strip()
    return pins


@pytest.mark.parametrize(
    "path", sorted(p for p in MIRRORS.glob("*.py") if p.name != "__init__.py"), ids=lambda p: p.stem
)
def test_every_mirror_names_its_pinned_version_and_an_existing_parity_test(path):
    docstring = ast.get_docstring(parsed(path)) or ""
    mirrored = re.findall(r"^Mirrors: ([\w.-]+)==(\S+)", docstring, re.MULTILINE)
    tests = re.findall(r"^Parity test: (\S+)::(\w+)$", docstring, re.MULTILINE)
    assert len(mirrored) == 1, f"{path.name} must say once which pinned version it mirrors"
    assert tests, f"{path.name} must name the parity test that guards it"
    package, version = mirrored[0]
    assert pinned_versions().get(package.lower()) == version, f"requirements.lock pins {package}"
    assert importlib.metadata.version(package) == version, f"{package} installed differs"
    for file, test in tests:
        source = ast.parse((REPO_ROOT / "tests" / file).read_text())
        defined = {n.name for n in source.body if isinstance(n, ast.FunctionDef)}
        assert test in defined, f"{path.name}: {file} has no {test}"


def test_only_mirrors_import_a_dependencys_private_names():
    """Code that reuses a library's private helpers (``_name``) belongs in keel/mirrors."""
    ours = {*PACKAGES, "tests", "bench"}
    offenders = []
    for path in python_files(*PACKAGES):
        if path.is_relative_to(MIRRORS):
            continue
        for node in ast.walk(parsed(path)):
            if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                continue
            if node.module.split(".")[0] in ours or node.module == "__future__":
                continue
            if private := [a.name for a in node.names if a.name.startswith("_")]:
                where = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
                offenders.append(f"{where} {node.module}: {', '.join(private)}")
    assert not offenders, offenders


# -- one place per resource, one source per setting ----------------------------------------------


@pytest.mark.parametrize("profile", ["local", "production"])
def test_every_resource_of_a_profile_is_defined_in_orchestration_resources(profile):
    from orchestration.profiles import resources_for

    elsewhere = {
        key: type(resource).__module__
        for key, resource in resources_for(profile).items()
        if type(resource).__module__ != "orchestration.resources"
    }
    assert not elsewhere, elsewhere
    profiles = ast.parse((REPO_ROOT / "orchestration" / "profiles.py").read_text())
    assert not {name for name in runtime_imports(profiles) if name.split(".")[0] == "assets"}


def calls_to(tree: ast.Module, names: set[str]) -> list[int]:
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (ast.unparse(node.func) in names or ast.unparse(node.func).split(".")[-1] in names)
    ]


def test_keel_home_is_read_in_settings_and_resolved_by_the_profile_alone():
    """Resources and assets take their paths from the profile's KeelPaths, never from the
    environment; only keel.settings reads KEEL_HOME."""
    environment_reads = []
    for path in python_files(*PACKAGES):
        if path == REPO_ROOT / "keel" / "settings.py":
            continue
        for node in ast.walk(parsed(path)):
            text = ast.unparse(node) if isinstance(node, ast.Call | ast.Subscript) else ""
            if ("environ" in text or "getenv" in text) and (
                "KEEL_HOME" in text or "HOME_ENV" in text
            ):
                environment_reads.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert not environment_reads, environment_reads
    resolved = {
        f"{path.relative_to(REPO_ROOT)}:{line}"
        for path in python_files("assets", "orchestration")
        if path != REPO_ROOT / "orchestration" / "profiles.py"
        for line in calls_to(parsed(path), {"KeelPaths.current", "keel_home"})
    }
    assert not resolved, f"resolve KEEL_HOME in orchestration/profiles.py only: {resolved}"


def test_the_first_day_is_written_once():
    from assets.partitions import DAILY_PARTITIONS
    from keel.datasets.spec import loop_dataset
    from keel.generator import GeneratorConfig
    from keel.schema import FIRST_DAY

    places = []
    for path in python_files(*PACKAGES):
        tree = parsed(path)
        docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
        for node in ast.walk(tree):
            literal = isinstance(node, ast.Constant) and node.value == FIRST_DAY
            call = isinstance(node, ast.Call) and ast.unparse(node).startswith("date(2026, 1, 1")
            if (literal and id(node) not in docstrings) or call:
                places.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    # Written in the loop's dataset.yaml alone; keel.schema reads it from there.
    assert places == [], places
    assert FIRST_DAY and loop_dataset().first_day == FIRST_DAY
    assert DAILY_PARTITIONS.start.date().isoformat() == FIRST_DAY
    assert GeneratorConfig().start.isoformat() == FIRST_DAY


def test_monitoring_thresholds_have_one_default():
    import inspect

    from keel.inference import summarise_scores
    from keel.monitoring import data_drift, evidently_data_drift, performance
    from keel.monitoring_policy import (
        DEFAULT_DECISION_THRESHOLD,
        DEFAULT_DRIFT_SHARE,
        RetrainPolicy,
    )
    from orchestration.resources import MonitoringResource

    def default(function, name):
        return inspect.signature(function).parameters[name].default

    resource, policy = MonitoringResource(), RetrainPolicy()
    assert resource.min_rows == policy.min_rows
    assert resource.drift_share == DEFAULT_DRIFT_SHARE
    for function in (data_drift, evidently_data_drift):
        assert default(function, "drift_share") == DEFAULT_DRIFT_SHARE
    assert resource.decision_threshold == DEFAULT_DECISION_THRESHOLD
    assert default(performance, "threshold") == DEFAULT_DECISION_THRESHOLD
    assert default(summarise_scores, "threshold") == DEFAULT_DECISION_THRESHOLD


# Entry points of their own processes, where setting the environment is the point.
ENVIRONMENT_OWNERS = {
    "keel/cli.py",
    "keel/dagster_home.py",
    "keel/team/cli.py",
    # Drives the scenario's processes: the run queue's code server inherits its environment.
    "keel/team/play.py",
    "keel/serving/cli.py",
    "keel/dashboards/cli.py",
    "keel/edge/isolated.py",
}


def test_no_pipeline_code_changes_the_process_environment():
    """dbt gets the warehouse through its invocation's variables, not through os.environ."""
    writes = []
    for path in python_files("keel", "assets", "orchestration"):
        if str(path.relative_to(REPO_ROOT)) in ENVIRONMENT_OWNERS:
            continue
        for node in ast.walk(parsed(path)):
            targets = []
            if isinstance(node, ast.Assign | ast.AugAssign | ast.Delete):
                targets = (
                    node.targets if isinstance(node, ast.Assign | ast.Delete) else [node.target]
                )
            mutated = any(
                isinstance(t, ast.Subscript) and ast.unparse(t.value).endswith("environ")
                for t in targets
            )
            if isinstance(node, ast.Call):
                function = ast.unparse(node.func)
                mutated = (
                    function.startswith("os.environ.")
                    and function.rsplit(".", 1)[1]
                    in {
                        "update",
                        "pop",
                        "setdefault",
                        "clear",
                        "popitem",
                    }
                ) or function in {"os.putenv", "os.unsetenv"}
            if mutated:
                writes.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert not writes, (
        f"set the environment only in entry points ({sorted(ENVIRONMENT_OWNERS)}); pass "
        f"settings to the code that needs them instead: {writes}"
    )


def test_dbt_models_are_named_through_dagster_dbt():
    """A dbt model's asset key comes from get_asset_key_for_model or a dbt selection, so a
    translator change cannot leave a hand-written key pointing at nothing."""
    models = {path.stem for path in (REPO_ROOT / "datasets").glob("*/dbt/**/*.sql")}
    literals = []
    for path in python_files("assets", "orchestration"):
        tree = parsed(path)
        allowed = {
            id(argument)
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and ast.unparse(node.func).endswith("get_asset_key_for_model")
            for argument in node.args
        }
        literals += [
            f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.value}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in models and id(node) not in allowed
        ]
    assert not literals, literals


# -- lint in CI, documents about the project alone -----------------------------------------------


def test_ci_runs_the_tests_then_the_linters_and_pytest_runs_no_linter():
    steps = [
        line.strip()
        for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip().startswith("make ")
    ]
    assert steps == ["make test", "make test-team", "make lint"]
    makefile = (REPO_ROOT / "Makefile").read_text()
    # The team stage runs the tests marked `team` (slow ones too), which `make test` skips.
    team = makefile.split("\ntest-team:", 1)[1].split("\n\n", 1)[0]
    assert "-m team" in team
    lint = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    for command in ("ruff check", "ruff format --check", "sqlfluff lint"):
        assert command in lint, command
    running_linters = [
        path.name
        for path in (REPO_ROOT / "tests").glob("test_*.py")
        if re.search(r"[\"'](ruff|sqlfluff)[\"']", path.read_text())
    ]
    assert not running_linters, running_linters


OUTSIDE_DOCUMENTS = re.compile(
    r"\b(the|this|our) (article|issue|ticket|brief|guide|blog post|tutorial)\b"
    r"|\bstage \d+ of\b|\]\(\.\./",
    re.IGNORECASE,
)


def test_readme_and_code_speak_of_the_project_alone():
    """No references to documents the repository does not hold (an article, an issue...)."""
    texts = [REPO_ROOT / "README.md", *python_files(*PACKAGES, "bench")]
    texts += sorted((REPO_ROOT / "datasets").glob("*/dbt/**/*.yml"))
    found = [
        f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}"
        for path in texts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if OUTSIDE_DOCUMENTS.search(line)
    ]
    assert not found, found


def test_report_tables_and_images_are_rendered_in_keel_reporting():
    """Markdown and HTML tables and inline PNGs come from one helper, formatted one way."""
    handmade = re.compile(r"data:image/|<table|^\|?\s*-{3}|\|\s*-{3}\s*\|")
    found = []
    for path in python_files(*PACKAGES):
        if path == REPO_ROOT / "keel" / "reporting.py":
            continue
        tree = parsed(path)
        docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
        found += [
            f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.value[:40]!r}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and handmade.search(node.value)
        ]
    assert not found, found
