"""`pip install .` (issue 23, item 2): the wheel declares every distribution its modules import, in the pins of
requirements.txt; test tools are an extra, never a runtime dependency. Built offline (no build isolation)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_TOOLS = {"pytest", "pytest-timeout", "hypothesis"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return canonical(re.match(r"\s*([A-Za-z0-9_.-]+)", req).group(1))


def requirements_txt() -> list[str]:
    return [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_pyproject_declares_the_pins_of_requirements_txt_and_test_tools_as_an_extra():
    project = pyproject()
    assert sorted(project["dependencies"]) == sorted(requirements_txt())
    assert all("==" in req for req in project["dependencies"]), "every runtime dependency is pinned"
    runtime = {requirement_name(r) for r in project["dependencies"]}
    assert not runtime & TEST_TOOLS, "test tools are not runtime dependencies"
    assert {requirement_name(r) for r in project["optional-dependencies"]["test"]} >= TEST_TOOLS


def third_party_imports(sources: dict[str, str], module_level: bool = False) -> dict[str, set[str]]:
    """Top-level names of every module imported anywhere in ``sources`` (file -> text), outside the standard
    library and akod_ray itself, with the files that import them; ``module_level``: only the imports a module
    runs when it is imported (those outside functions)."""
    found: dict[str, set[str]] = {}
    for name, text in sources.items():
        tree = ast.parse(text)
        inside = set()
        if module_level:
            for fn in ast.walk(tree):
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    inside |= {id(n) for n in ast.walk(fn)}
        for node in ast.walk(tree):
            if id(node) in inside:
                continue
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top not in sys.stdlib_module_names and top != "akod_ray":
                    found.setdefault(top, set()).add(name)
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the repository's package files (the checkout gets no build/ or egg-info)."""
    import shutil

    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "akod_ray", src / "akod_ray", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("akod_ray-*.whl")
    return path


@pytest.mark.timeout(300)
def test_the_wheel_declares_every_distribution_its_modules_import(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = z.read(meta_name).decode()
        sources = {n: z.read(n).decode() for n in names if n.endswith(".py")}
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    runtime = {requirement_name(r) for r in requires if "extra ==" not in r}
    extras = {requirement_name(r) for r in requires if "extra == \"test\"" in r or "extra == 'test'" in r}
    # the optional integrations' extras (mlflow, optuna): imported only inside the functions that use them
    optional = {requirement_name(r) for r in requires if "extra ==" in r} - extras
    assert runtime == {requirement_name(r) for r in requirements_txt()}
    assert extras >= TEST_TOOLS and not runtime & TEST_TOOLS
    # Every module of the checkout is in the wheel, and the shipped classifier with it.
    in_repo = {str(p.relative_to(ROOT)) for p in (ROOT / "akod_ray").rglob("*.py")}
    assert in_repo <= set(sources)
    assert "akod_ray/evaluation/weights/c10_classifier.pt" in names
    # Every import of a module in the wheel comes from a declared distribution.
    dists = packages_distributions()
    undeclared, eager = {}, {}
    for top, files in third_party_imports(sources).items():
        provided = {canonical(d) for d in dists.get(top, [])}
        assert provided, f"{top} (imported by {sorted(files)}) is not installed here"
        if not provided & (runtime | optional):
            undeclared[top] = sorted(files)
    assert not undeclared, f"imported but not declared in Requires-Dist: {undeclared}"
    for top, files in third_party_imports(sources, module_level=True).items():
        provided = {canonical(d) for d in dists.get(top, [])}
        if not provided & runtime:
            eager[top] = sorted(files)
    assert not eager, f"an optional extra's module imported at module level (import fails without it): {eager}"


@pytest.mark.timeout(300)
def test_the_installed_wheel_imports_its_modules_from_itself(wheel, tmp_path):
    """Installed on its own (its dependencies from this environment), the package's modules import from the
    installed copy, not from the checkout: nothing the code needs is missing from the wheel."""
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = ("import importlib, pkgutil, akod_ray, akod_ray.pipeline\n"
            "mods = [m.name for m in pkgutil.walk_packages(akod_ray.__path__, 'akod_ray.')]\n"
            "[importlib.import_module(m) for m in mods if m != 'akod_ray.__main__']\n"
            "print(akod_ray.__file__, len(mods))\n")
    proc = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r})\n" + code],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(str(site / "akod_ray")), proc.stdout
