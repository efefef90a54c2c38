"""Installable like a Python project: the wheel, its console scripts, and core imports covered by the core
requirements.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from api.doctor import (
    OPTIONAL_MODULES,
    PROJECT_PACKAGES,
    ROOT,
    core_requirements,
    modules_of_distributions,
    normalize_name,
)
from common.version import __version__

SCRIPTS = {
    "sd-server": "python -m api",
    "sd-relay": "python -m relay",
    "sd-worker": "python -m worker",
    "sd-produce": "python -m producers",
    "sd-view": "view",
    "sd-doctor": "python -m api.doctor",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported when ``path`` is imported: module-level statements, not those inside functions,
    nor ``if TYPE_CHECKING`` blocks, nor a ``try`` whose ``except ImportError`` makes them optional."""
    names: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try) and not any(
                "ImportError" in ast.unparse(h.type or ast.Name("")) for h in node.handlers
            ):
                visit(node.body)

    visit(ast.parse(path.read_text()).body)
    return names


def test_core_modules_import_only_core_requirements():
    """What broke `make run` once: api/streams/style_image.py imported httpx, a dev-only requirement."""
    provided = modules_of_distributions()
    core = {m for req in core_requirements() for m in provided.get(normalize_name(req.name), [])}
    assert {"websockets", "cv2", "yaml", "httpx"} <= core
    stdlib = set(sys.stdlib_module_names)
    missing = []
    for package in PROJECT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = _module_name(path)
            if module.startswith(OPTIONAL_MODULES):
                continue
            for name in _top_level_imports(path) - stdlib - set(PROJECT_PACKAGES) - {"__future__"}:
                if name not in core:
                    missing.append(f"{module} imports {name}")
    assert not missing, "imports outside requirements.txt: " + "; ".join(missing)


def test_one_version_number():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert importlib.metadata.version("streamdiffusion-server") == __version__


def _not_source(directory: str, names: list[str]) -> set[str]:
    """What ``copytree`` leaves out of the copy built from: the checkout's VCS, environments and outputs."""
    skipped = {"__pycache__"}
    if Path(directory) == ROOT:
        skipped |= {".git", ".venv", ".whl", "build", "dist", "artifacts", "out", ".hypothesis"}
    return {name for name in names if name in skipped or name.endswith((".egg-info", "_cache"))}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtualenv with the project's wheel installed (dependencies: this environment's, by .pth)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # pip builds in the tree it is given (build/, *.egg-info): not in the checkout
    shutil.copytree(ROOT, source, symlinks=True, ignore=_not_source)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(work / "dist"),
            str(source),
        ],
        check=True,
        cwd=work,
        timeout=300,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    (wheel,) = (work / "dist").glob("streamdiffusion_server-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # the dependencies come from this environment; the project must come from the wheel only
    (Path(site) / "outer_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        cwd=work,
        timeout=300,
    )
    return venv


def test_wheel_installs_the_packages_and_the_web_page(installed):
    python = installed / "bin" / "python"
    where = subprocess.run(
        [
            python,
            "-c",
            (
                "import api, relay, worker, producers, wire, media, common, importlib.resources as r;"
                "print(api.__file__); print(r.files('api').joinpath('web/static/index.html').is_file())"
            ),
        ],
        cwd=installed,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    assert where[0].startswith(str(installed)), f"imported from {where[0]}, not the installed wheel"
    assert where[1] == "True", "api/static is missing from the wheel"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_answers_help(installed, script):
    result = subprocess.run(
        [installed / "bin" / script, "--help"], cwd=installed, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and SCRIPTS[script] in result.stdout
