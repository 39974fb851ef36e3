"""The Python examples of the README and of docs/python.md run as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "docs" / "python.md"]


def python_blocks() -> list:
    return [
        pytest.param(page.name, block, id=f"{page.name}-{i}")
        for page in PAGES
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
    ]


@pytest.mark.parametrize("page,block", python_blocks())
def test_python_example_runs(page, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files
    exec(compile(block, page, "exec"), {})


def test_docs_links_point_to_files():
    """Every relative link of the README, CONTRIBUTING and the docs pages names a file of the repository."""
    for page in [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).resolve().exists(), f"{page.name}: {target}"
