"""The distribution: its name, its declared floors and the lowest-versions constraints agree.

``.ci/run`` runs the suite once more under ``constraints/lowest.txt`` (``make test-lowest``);
these tests keep that file equal to the floors ``pyproject.toml`` declares, so the versions
it admits are the versions it tests, and keep every documented install line on the project's
own distribution name (``ctxkit`` on the package index is an unrelated project).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = "ctxkit-async"
#: Test tools: they run the suite, they are not what it tests; left at their latest.
TOOLS = frozenset(
    {
        "pytest",
        "pytest-asyncio",
        "pytest-cov",
        "coverage",
        "hypothesis",
        "mypy",
        "ruff",
        "import-linter",
        "grimp",
    }
)
#: Extras that are not installed by the suite.
UNTESTED_EXTRAS = frozenset({"bench", "docs"})


def _pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _project() -> dict[str, object]:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    return project


def _floors() -> dict[str, str]:
    """Return each tested dependency's ``>=`` floor, by canonical name."""
    project = _project()
    specs = list(project["dependencies"])  # type: ignore[call-overload]
    extras = project["optional-dependencies"]
    assert isinstance(extras, dict)
    for extra, requirements in extras.items():
        if extra not in UNTESTED_EXTRAS:
            specs.extend(requirements)
    floors: dict[str, str] = {}
    for spec in specs:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        if name in TOOLS:
            continue
        lower = [s.version for s in requirement.specifier if s.operator == ">="]
        assert len(lower) == 1, f"{spec!r} needs exactly one >= floor to be tested at"
        assert floors.setdefault(name, lower[0]) == lower[0], f"two floors for {name}"
    return floors


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints" / "lowest.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name in TOOLS:  # a cap that keeps a tool working with the pinned versions
            continue
        pinned = [s.version for s in requirement.specifier if s.operator == "=="]
        assert pinned, f"constraints/lowest.txt: {line!r} is not a name==version pin"
        pins[name] = pinned[0]
    return pins


def _installed_names(line: str) -> list[str]:
    """Return the distribution names a ``pip install`` command in ``line`` asks for."""
    _, found, command = line.partition("pip install ")
    if not found:
        return []
    names: list[str] = []
    for word in command.split("#", 1)[0].split():
        word = word.strip("`'\"")
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", word)
        if match and not word.startswith("-"):
            names.append(canonicalize_name(match[0]))
    return names


class TestDistribution:
    def test_name_is_not_the_unrelated_ctxkit(self) -> None:
        """The distribution has its own name; the import name stays ctxkit."""
        assert _project()["name"] == DISTRIBUTION

    def test_lowest_constraints_pin_every_floor(self) -> None:
        """constraints/lowest.txt pins each tested dependency at exactly its declared floor."""
        floors = _floors()
        assert {"anyio", "opentelemetry-api", "trio", "taskiq", "structlog"} <= floors.keys()
        pins = _pins()
        for name, floor in floors.items():
            pinned = pins.get(name)
            assert pinned is not None, f"pin {name}=={floor} in constraints/lowest.txt"
            assert Version(pinned) == Version(floor), f"{name}: pin {pinned}, floor {floor}"
        assert pins.keys() <= floors.keys(), "a pin for something pyproject.toml does not list"

    def test_install_line_parsing(self) -> None:
        """The check below reads the names of a command, not its comment."""
        assert _installed_names("pip install 'ctxkit[sdk]' fastapi  # ctxkit.testing") == [
            "ctxkit",
            "fastapi",
        ]
        assert _installed_names('`pip install "ctxkit-async[taskiq]"`.') == ["ctxkit-async"]
        assert _installed_names("pip install -U ctxkit_async") == ["ctxkit-async"]

    def test_install_lines_use_the_distribution_name(self) -> None:
        """No README or docs line installs ``ctxkit`` itself: that is someone else's package."""
        pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        offenders = [
            f"{page.name}: {line.strip()}"
            for page in pages
            for line in page.read_text().splitlines()
            if "ctxkit" in _installed_names(line)
        ]
        assert offenders == []
        readme = (ROOT / "README.md").read_text()
        assert f"pip install {DISTRIBUTION}" in readme

    def test_the_pytest_plugin_module_is_shipped(self) -> None:
        """The pytest11 entry point names a top-level module (outside the ctxkit package, so
        that loading it imports nothing of ctxkit) that the wheel and the sdist both ship."""
        pyproject = _pyproject()
        [module] = pyproject["project"]["entry-points"]["pytest11"].values()
        assert "." not in module
        assert (ROOT / f"{module}.py").is_file()
        targets = pyproject["tool"]["hatch"]["build"]["targets"]
        assert f"{module}.py" in targets["wheel"]["only-include"]
        assert f"{module}.py" in targets["sdist"]["include"]
