"""Every ```python block of README.md and docs/ runs, or is a marked fragment that compiles.

The convention (docs/contributing.md says the same for writers):

- A block is a **fragment** when the line immediately above its opening fence is
  ``<!-- fragment -->``. A fragment is compiled (top-level ``await``/``async with`` allowed) and
  its absolute imports are checked: each module must import and each ``from m import name`` must
  find ``name``. A module of a package the test dependencies do not install (``OPTIONAL``) may
  be missing; when it is installed it is checked like the others. A fragment has no
  ``# prints:`` comments.
- Any other block is a **complete program**, run in a subprocess with ``sys.executable`` (from
  a fresh temporary directory, ``TIMEOUT`` seconds at most). It must exit with status 0.
- A comment ``# prints: <text>`` in a program (on its own line or after code) says that the
  program's output, stdout and stderr together, contains ``<text>`` on one line; several such
  comments must match in the order they appear. ``...`` in ``<text>`` stands for any characters
  of that line (ids, durations). Put the comment next to the line that prints.
- A block whose fence names a file (````` ```python title="app.py" `````) is written under that
  name. A ``test_*.py`` file is run with pytest instead (it must pass), in a directory that also
  holds the page's *earlier* titled files that are not tests (an ``app.py`` it imports, a
  ``conftest.py``).

A ``<!-- fragment -->`` line anywhere but right above a ```python fence is an error, so a
marker cannot silently stop applying. The test of this test (``TestTheChecker``) feeds it
synthetic pages that must fail.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import io
import os
import re
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ._support import FILTERWARNINGS

if TYPE_CHECKING:
    from collections.abc import Iterable

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARKER = "<!-- fragment -->"
TIMEOUT = 60.0
#: Packages that pages show but the test dependencies do not install, with the reason.
OPTIONAL = {
    "celery": "docs/celery.md: a recipe for Celery users",
    "opentelemetry.propagators.b3": "docs/propagation.md: the B3 propagator package",
    "sentry_sdk": "docs/faq.md: an error hook example",
    "arq": "docs/arq.md: arq is tested in a venv of its own (make test-arq)",
    "flask": "docs/threads.md: a Flask app factory",
}
_OPEN = re.compile(r"^```(?P<lang>[\w-]*)(?P<info>.*)$")
_TITLE = re.compile(r'title="(?P<title>[^"]+)"')
_PRINTS = re.compile(r"#\s*prints:\s?(?P<text>.*)$")
_PYTEST_INI = (
    "[pytest]\npythonpath = .\nasyncio_default_fixture_loop_scope = function\n" + FILTERWARNINGS
)


@dataclass(frozen=True)
class Block:
    """One ```python block of a page."""

    page: Path
    line: int  # of the opening fence, 1-based
    source: str
    fragment: bool
    title: str | None
    earlier: tuple[Block, ...] = ()  # the page's titled non-test blocks before this one

    @property
    def where(self) -> str:
        try:
            name = self.page.relative_to(ROOT)
        except ValueError:
            name = self.page
        return f"{name}:{self.line}"


def extract(page: Path) -> list[Block]:
    """Return the ```python blocks of ``page``; raise AssertionError on a misplaced marker."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    titled: list[Block] = []
    index = 0
    while index < len(lines):
        opening = _OPEN.match(lines[index])
        if lines[index].strip() == MARKER:
            following = lines[index + 1] if index + 1 < len(lines) else ""
            match = _OPEN.match(following)
            lang = match["lang"] if match else None
            assert lang == "python", (
                f"{page}:{index + 1}: {MARKER} must be the line right above a ```python fence"
            )
        if opening is None:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        assert end < len(lines), f"{page}:{index + 1}: the code block is never closed"
        if opening["lang"] == "python":
            title = _TITLE.search(opening["info"])
            block = Block(
                page=page,
                line=index + 1,
                source="\n".join(lines[index + 1 : end]) + "\n",
                fragment=index > 0 and lines[index - 1].strip() == MARKER,
                title=title["title"] if title else None,
                earlier=tuple(titled),
            )
            blocks.append(block)
            if block.title and not is_test(block) and not block.fragment:
                titled.append(block)
        index = end + 1
    return blocks


def is_test(block: Block) -> bool:
    return bool(block.title and re.fullmatch(r"test_\w*\.py", block.title))


def expectations(source: str) -> list[str]:
    """The ``<text>`` of each ``# prints: <text>`` comment of ``source``, in order."""
    found = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            match = _PRINTS.match(token.string)
            if match:
                found.append(match["text"].rstrip())
    return found


def assert_prints(output: str, expected: Iterable[str], where: str) -> None:
    """Assert each text appears in ``output``, on one line, in this order."""
    position = 0
    for text in expected:
        pattern = ".*?".join(re.escape(part) for part in text.split("..."))
        match = re.compile(pattern).search(output, position)
        assert match is not None, (
            f"{where}: the output lacks {text!r} (after what matched before).\n"
            f"--- output ---\n{output}"
        )
        position = match.end()


def check_imports(tree: ast.AST, where: str) -> None:
    """Assert every absolute import of ``tree`` resolves (see the module docstring)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                check_module(alias.name, where)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{where}: a relative import in the docs"
            assert node.module is not None
            module = check_module(node.module, where)
            if module is None:
                continue
            for alias in node.names:
                name = alias.name
                assert (
                    name == "*"
                    or hasattr(module, name)
                    or importlib.util.find_spec(f"{node.module}.{name}") is not None
                ), f"{where}: cannot import {name!r} from {node.module!r}"


def check_module(name: str, where: str) -> object | None:
    """Import ``name``; return None for a missing OPTIONAL package, fail for anything else."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        optional = any(name == key or name.startswith(key + ".") for key in OPTIONAL)
        if optional and exc.name is not None and not exc.name.startswith("ctxkit"):
            return None
        raise AssertionError(f"{where}: cannot import {name!r}: {exc}") from exc


def check_fragment(block: Block) -> None:
    try:
        tree = compile(
            block.source,
            block.where,
            "exec",
            flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
        )
    except SyntaxError as exc:
        raise AssertionError(f"{block.where}: the fragment does not compile: {exc}") from exc
    assert not expectations(block.source), (
        f"{block.where}: a fragment is never run, so it cannot say what it prints"
    )
    check_imports(tree, block.where)


def run(args: list[str], cwd: Path, where: str) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        result = subprocess.run(
            args,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{where}: still running after {TIMEOUT}s: {exc.output}") from exc
    assert result.returncode == 0, (
        f"{where}: exited with status {result.returncode}\n--- output ---\n{result.stdout}"
    )
    return result.stdout


def check_program(block: Block, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for earlier in block.earlier:
        (directory / str(earlier.title)).write_text(earlier.source, encoding="utf-8")
    name = block.title or "example.py"
    (directory / name).write_text(block.source, encoding="utf-8")
    if is_test(block):
        assert not expectations(block.source), f"{block.where}: a test file asserts instead"
        (directory / "pytest.ini").write_text(_PYTEST_INI, encoding="utf-8")
        output = run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", name],
            directory,
            block.where,
        )
        assert not re.search(r"\d+ (skipped|xfailed|deselected)", output), (
            f"{block.where}: not every test ran\n{output}"
        )
        return
    output = run([sys.executable, name], directory, block.where)
    assert_prints(output, expectations(block.source), block.where)


def check(block: Block, directory: Path) -> None:
    """Check one block: compile a fragment, run a program (see the module docstring)."""
    if block.fragment:
        check_fragment(block)
    else:
        check_program(block, directory)


BLOCKS = [block for page in PAGES for block in extract(page)]


@pytest.mark.parametrize("block", BLOCKS, ids=[block.where for block in BLOCKS])
def test_documented_example(block: Block, tmp_path: Path) -> None:
    """Each documented example runs and prints what its page says, or is a sound fragment."""
    check(block, tmp_path)


def test_every_python_block_is_found() -> None:
    """The extractor sees every ```python fence of every page, and the pages have programs."""
    fences = sum(
        1
        for page in PAGES
        for line in page.read_text(encoding="utf-8").splitlines()
        if line.startswith("```python")
    )
    assert len(BLOCKS) == fences
    assert sum(not block.fragment for block in BLOCKS) >= 20


def test_the_api_reference_is_current() -> None:
    """docs/api.md is what tests/_api_reference.py renders from the docstrings."""
    from . import _api_reference

    assert _api_reference.PAGE.read_text(encoding="utf-8") == _api_reference.render(), (
        "docs/api.md is out of date: run .venv/bin/python -m tests._api_reference"
    )


def page(tmp_path: Path, text: str) -> list[Block]:
    path = tmp_path / "page.md"
    path.write_text(text, encoding="utf-8")
    return extract(path)


def fails(block: Block, tmp_path: Path, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        check(block, tmp_path / "run")


class TestTheChecker:
    """The doc test fails on pages whose examples are broken."""

    def test_a_sound_page_passes(self, tmp_path: Path) -> None:
        """A program whose prints match (with a wildcard) and a fragment with top-level await."""
        blocks = page(
            tmp_path,
            "# Page\n\n```python\nimport uuid\n\nprint('one')  # prints: one\n"
            "print('id', uuid.uuid4())  # prints: id ...\n```\n\n"
            "<!-- fragment -->\n```python\nimport ctxkit\n\nawait ctxkit.drain()\n```\n",
        )
        assert [block.fragment for block in blocks] == [False, True]
        for block in blocks:
            check(block, tmp_path / f"b{block.line}")

    def test_a_program_that_raises_fails(self, tmp_path: Path) -> None:
        """A complete program must exit with status 0."""
        (block,) = page(tmp_path, "```python\nimport ctxkit\n\nctxkit.spawn(None)\n```\n")
        fails(block, tmp_path, "exited with status 1")

    def test_a_program_that_prints_something_else_fails(self, tmp_path: Path) -> None:
        """What a `# prints:` comment says must be in the output."""
        (block,) = page(tmp_path, "```python\nprint('two')  # prints: three\n```\n")
        fails(block, tmp_path, "lacks 'three'")

    def test_prints_must_come_in_order(self, tmp_path: Path) -> None:
        """Several `# prints:` comments match in the order they are written."""
        source = "```python\nprint('b')\nprint('a')\n# prints: a\n# prints: b\n```\n"
        (block,) = page(tmp_path, source)
        fails(block, tmp_path, "lacks 'b'")

    def test_a_wildcard_stays_on_one_line(self, tmp_path: Path) -> None:
        """`...` matches within a line only."""
        (block,) = page(tmp_path, "```python\nprint('a')\nprint('b')  # prints: a...b\n```\n")
        fails(block, tmp_path, "lacks 'a...b'")

    def test_an_unmarked_fragment_fails(self, tmp_path: Path) -> None:
        """A block with top-level await and no marker is run, and fails."""
        (block,) = page(tmp_path, "```python\nimport ctxkit\n\nawait ctxkit.drain()\n```\n")
        fails(block, tmp_path, "exited with status 1")

    def test_a_fragment_that_does_not_compile_fails(self, tmp_path: Path) -> None:
        """Fragments are compiled."""
        (block,) = page(tmp_path, f"{MARKER}\n```python\n@decorator\n```\n")
        fails(block, tmp_path, "does not compile")

    def test_a_fragment_importing_a_lost_name_fails(self, tmp_path: Path) -> None:
        """A name the API no longer has, or a module that does not exist, fails a fragment."""
        (block,) = page(tmp_path, f"{MARKER}\n```python\nfrom ctxkit import spawn_later\n```\n")
        fails(block, tmp_path, "cannot import 'spawn_later' from 'ctxkit'")
        (block,) = page(tmp_path, f"{MARKER}\n```python\nimport ctxkit.contrib.nope\n```\n")
        fails(block, tmp_path, "cannot import 'ctxkit.contrib.nope'")

    def test_a_fragment_cannot_claim_output(self, tmp_path: Path) -> None:
        """A fragment never runs, so a `# prints:` in it is an error."""
        (block,) = page(tmp_path, f"{MARKER}\n```python\nprint(1)  # prints: 1\n```\n")
        fails(block, tmp_path, "cannot say what it prints")

    def test_a_misplaced_marker_fails(self, tmp_path: Path) -> None:
        """A marker that is not right above a python fence is refused."""
        with pytest.raises(AssertionError, match="right above a ```python fence"):
            page(tmp_path, f"{MARKER}\n\n```python\nprint(1)\n```\n")

    def test_a_failing_test_file_fails(self, tmp_path: Path) -> None:
        """A titled test file runs under pytest, with the earlier app file beside it."""
        blocks = page(
            tmp_path,
            '```python title="app.py"\nVALUE = 1\n```\n\n'
            '```python title="test_app.py"\nfrom app import VALUE\n\n\n'
            "def test_value() -> None:\n    assert VALUE == 2\n```\n",
        )
        assert [block.title for block in blocks[1].earlier] == ["app.py"]
        fails(blocks[1], tmp_path, "exited with status 1")

    def test_a_skipped_test_file_fails(self, tmp_path: Path) -> None:
        """Skipping into green does not count."""
        (block,) = page(
            tmp_path,
            '```python title="test_skip.py"\nimport pytest\n\n\n'
            "@pytest.mark.skip\ndef test_nothing() -> None:\n    pass\n```\n",
        )
        fails(block, tmp_path, "not every test ran")
