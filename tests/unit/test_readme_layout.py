"""The README's layout table names every file of cluster/, deploy/ and llama/ under its package
(a package's __init__.py aside), and nothing that is not in the tree."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _named() -> set[str]:
    """Each path the table's first column names: a row under a **`pkg/`** row names files of pkg."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Layout: where each thing happens", 1)[1].split("\n## ", 1)[0]
    named, package = set(), ""
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| file |"):
            continue
        first = line.split("|")[1]
        names = re.findall(r"`([^`]+)`", first)
        if first.strip().startswith("**"):
            package = names[0] if len(names) == 1 and names[0].startswith(("llama/", "cluster/", "deploy/")) else ""
            continue
        named |= {package + n for n in names}
    return named


def _tree() -> set[str]:
    files = set()
    for top in ("cluster", "deploy", "llama"):
        for path in (ROOT / top).rglob("*"):
            if path.suffix in (".py", ".yaml", ".json") and path.name != "__init__.py" and "__pycache__" not in path.parts:
                files.add(path.relative_to(ROOT).as_posix())
    return files


def test_the_layout_table_names_every_file_and_only_files_that_exist():
    named, tree = _named(), _tree()
    assert sorted(tree - named) == [], "files the README's layout table does not name"
    assert sorted(named - tree) == [], "names in the README's layout table that are not files"
