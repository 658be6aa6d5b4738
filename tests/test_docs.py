"""The design lives in the repository: every section reference resolves, nothing points outside."""

from __future__ import annotations

import re
import subprocess

from _music import REPO

DESIGN = REPO / "docs" / "design.md"


def tracked_text_files() -> dict[str, str]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    out = {}
    for name in names:
        if name.endswith((".py", ".md", ".yaml", ".toml", ".sh", ".txt")) and (REPO / name).is_file():
            out[name] = (REPO / name).read_text(errors="replace")
    return out


def test_every_design_reference_names_an_existing_section():
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", DESIGN.read_text(), flags=re.M)}
    assert sections == set(range(1, 9))
    cited = set()
    for name, text in tracked_text_files().items():
        for match in re.finditer(r"docs/design\.md sections? (\d+)(?: and (\d+))?", text):
            for number in filter(None, match.groups()):
                assert int(number) in sections, f"{name}: {match.group(0)}"
                cited.add(int(number))
    assert cited >= {2, 3, 4, 6, 7, 8}  # the modules of each part point to their section


def test_nothing_refers_to_a_path_outside_the_repository():
    outside = re.compile(r"\.\./shared|shared/spec|DESIGN\.md|DESIGN section")
    this_file = "tests/test_docs.py"
    offenders = [name for name, text in tracked_text_files().items() if name != this_file and outside.search(text)]
    assert offenders == []
