"""Packaging: one version for the package and the command line, metadata in pyproject.toml, Triton an extra."""

from pathlib import Path

import pytest
import tomllib

import aunn_fast
from aunn_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"aunn_fast {aunn_fast.__version__}\n"


def test_pyproject_reads_the_version_from_the_package_and_declares_the_basics():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    assert "version" in project["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "aunn_fast.__version__"}
    assert (ROOT / project["license-files"][0]).is_file()
    assert (Path(aunn_fast.__file__).parent / "py.typed").is_file()
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["aunn_fast"]
    assert project["scripts"]["aunn"] == "aunn_fast.cli:main"
    assert "torch" not in str(pyproject["build-system"]["requires"])  # no multi-GB torch in an isolated build


def test_triton_is_an_extra_that_dev_pulls():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(dep.startswith("triton") for dep in project["dependencies"])
    extras = project["optional-dependencies"]
    assert any(dep.startswith("triton") for dep in extras["triton"])
    dev_extras = [dep[len("aunn_fast[") : -1].split(",") for dep in extras["dev"] if dep.startswith("aunn_fast[")]
    assert any("triton" in names for names in dev_extras)
