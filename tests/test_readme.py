"""The README and the docs point only at files the repository has (a fresh clone has no ``../shared``)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve_inside_the_repository(doc):
    text = doc.read_text()
    targets = [t for t in LINK.findall(text) if not re.match(r"[a-z]+://", t)]
    assert targets or doc.name != "README.md", "the README links its plots and docs"
    for target in targets:
        path = (doc.parent / target).resolve()
        assert path.is_relative_to(ROOT), f"{doc.name} links {target}, outside the repository"
        assert path.exists(), f"{doc.name} links {target}, which does not exist"


def test_readme_names_no_path_outside_the_repository():
    assert "../shared" not in (ROOT / "README.md").read_text()
