"""Every relative link in README.md and docs/ points to a file (or folder) that git tracks, and
every ``#anchor`` into a Markdown file names one of its headings (issue 17)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _tracked() -> set[str] | None:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return set(out.splitlines())


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in md.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            title = re.sub(r"[^\w\- ]", "", title)
            out.add(title.replace(" ", "-"))
    return out


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _links(md: Path) -> list[str]:
    text = md.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    return [m.group(1) for m in LINK.finditer(text)]


@pytest.mark.parametrize("md", _documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_tracked_files(md: Path) -> None:
    tracked = _tracked()
    if tracked is None:
        pytest.skip("not a git checkout")
    folders = {str(Path(t).parent) for t in tracked} | {
        str(p) for t in tracked for p in Path(t).parents
    }
    bad = []
    for link in _links(md):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link) or (link.startswith("#") and not link[1:]):
            continue  # http(s), mailto, ...
        target, _, anchor = link.partition("#")
        path = (md.parent / unquote(target)).resolve() if target else md
        rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        if target and rel not in tracked and rel.rstrip("/") not in folders:
            bad.append(f"{link} (not tracked)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            bad.append(f"{link} (no heading #{anchor})")
    assert not bad, f"{md.name}: " + ", ".join(bad)
