"""The shape of the code base: module sizes, imports, where settings and mirrors live.

Every check reads the source (AST or text) and names the offending file and line, so they run in
well under a second and say exactly what to fix.
"""

import ast
import importlib.metadata
import re
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = ("keel", "assets", "orchestration", "feature_repo")
MAX_MODULE_LINES = 700


def python_files(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (REPO_ROOT / package).rglob("*.py"))


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
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}"


def test_keel_modules_import_each_other_without_a_cycle():
    """Function-level imports count too: a lazy import back is still a cycle in the design."""
    paths = {module_name(path): path for path in python_files("keel")}
    graph = {
        name: (runtime_imports(ast.parse(path.read_text())) & paths.keys()) - {name}
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
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
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
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                continue
            if node.module.split(".")[0] in ours or node.module == "__future__":
                continue
            if private := [a.name for a in node.names if a.name.startswith("_")]:
                where = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
                offenders.append(f"{where} {node.module}: {', '.join(private)}")
    assert not offenders, offenders
