"""An install a user can do: the wheel built from this tree holds a working ``fedbip`` at the version the
CHANGELOG's newest section names.

The wheel is built without network (``--no-build-isolation``: the build backend of the test's own
environment) and unpacked with ``pip install --no-deps --target``; its CLI then runs from that directory,
outside the source tree, on the test environment's dependencies.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from fedbip_cli import __version__

ROOT = Path(__file__).resolve().parents[1]


def test_the_version_is_written_once_and_the_changelog_names_it() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in project["project"]["dynamic"] and "version" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fedbip_cli.__version__"}
    sections = re.findall(r"^## \[?(\d+\.\d+\.\d+)", (ROOT / "CHANGELOG.md").read_text(), flags=re.MULTILINE)
    assert sections[0] == __version__ == "0.2.0", sections


def test_a_built_wheel_installs_a_working_cli(tmp_path: Path) -> None:
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("fedbip-*.whl")
    assert wheel.name == f"fedbip-{__version__}-py3-none-any.whl"
    target = tmp_path / "site"
    unpacked = subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], timeout=300)
    assert unpacked.returncode == 0
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = [sys.executable, "-c", "import sys, fedbip_cli.cli as c; print(c.__file__); sys.argv[0] = 'fedbip'; c.main()"]
    version = subprocess.run([*run, "--version"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert version.returncode == 0, version.stderr
    where, shown = version.stdout.splitlines()[:2]
    assert Path(where).is_relative_to(target) and shown == f"fedbip {__version__}"
    assert (target / "fedbip_cli" / "simulate" / "flower" / "app" / "pyproject.toml").is_file()  # package data


def test_readme_and_ci_example_install_what_exists() -> None:
    """fedbip is on no index: the README and the CI example install from a clone, a built wheel (of this
    version) or a git URL, never ``pip install fedbip`` by name."""
    import yaml

    readme = (ROOT / "README.md").read_text()
    steps = yaml.safe_load((ROOT / "examples" / "ci" / "merge-adapters.yml").read_text())["jobs"]["merge"]["steps"]
    install = next(step["run"] for step in steps if "fedbip" in step.get("name", "").lower() and "run" in step)
    for text in (readme, install):
        assert not re.search(r"pip install '?fedbip(\[\w+\])?'?\s(?!\s*@)", text), text[:200]  # a name, not a URL
    assert f"fedbip-{__version__}-py3-none-any.whl" in install and f"fedbip-{__version__}-py3-none-any.whl" in readme
    assert "python -m pip install ." in readme and "pip wheel" in readme


def test_the_package_uses_only_typers_public_api() -> None:
    """Users run fedbip on two typers: below 0.21 (flwr's pin, the [flower] extra) and the newest (a plain
    install), which vendors its own click and dropped ``click_type``. So no module imports click or a
    private typer module, and no option passes ``click_type`` (the wheel's ``fedbip --help`` failed so)."""
    import ast

    found = []
    for path in sorted((ROOT / "fedbip_cli").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.keyword) and node.arg == "click_type":
                names = ["click_type="]
            bad = [
                n for n in names if n == "click_type=" or n.split(".")[0] == "click" or "._" in f".{n}" and "typer" in n
            ]
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in bad]
    assert not found, found
