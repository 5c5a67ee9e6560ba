"""mkdocs hooks: the site's changelog page is the repository's CHANGELOG.md.

On the forge, docs/changelog.md is a short page that links to ../CHANGELOG.md; when the site is
built, this hook replaces that page's Markdown with the changelog itself, so the site shows it
in full and nobody keeps two copies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHANGELOG = Path(__file__).resolve().parent.parent / "CHANGELOG.md"


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Return CHANGELOG.md for the changelog page, every other page as it is."""
    if page.file.src_uri == "changelog.md":
        return CHANGELOG.read_text(encoding="utf-8")
    return markdown
