"""Generate docs/api.md from the docstrings: plain Markdown, readable on the site and the forge.

Run ``python -m tests._api_reference`` to rewrite the page; ``tests/test_docs.py`` fails while
the page differs from what this renders. Google-style sections become Markdown (``Args:`` a
list, ``Semantics:`` paragraphs), RST literals (````x````) become code spans, ``::`` blocks
become fenced code (Python when it compiles), and each signature is a ``<!-- fragment -->``
Python block, so the doc test compiles it.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

PAGE = Path(__file__).resolve().parent.parent / "docs" / "api.md"
MODULES = (
    "ctxkit",
    "ctxkit.propagation",
    "ctxkit.sampling",
    "ctxkit.testing",
    "ctxkit.contrib.arq",
    "ctxkit.contrib.asgi",
    "ctxkit.contrib.celery",
    "ctxkit.contrib.procrastinate",
    "ctxkit.contrib.dramatiq",
    "ctxkit.contrib.litestar",
    "ctxkit.contrib.starlette",
    "ctxkit.contrib.structlog",
    "ctxkit.contrib.taskiq",
)
SECTIONS = {
    "Args": "Arguments",
    "Attributes": "Attributes",
    "Raises": "Raises",
    "Returns": "Returns",
    "Yields": "Yields",
    "Semantics": "Semantics",
    "Example": "Example",
    "Examples": "Examples",
    "Note": "Note",
    "Warning": "Warning",
}
LISTED = {"Args", "Attributes", "Raises"}
WIDTH = 96
INTRO = """\
# API reference

Every public name of ctxkit, generated from the docstrings by `python -m tests._api_reference`
(the test suite checks that this page is current). The guide pages explain the semantics in
prose: [Cloning](cloning.md), [Background work](background.md), [Propagation](propagation.md),
[Logging](logging.md), [Testing](testing.md).
"""


class _Annotation(str):
    """A string annotation that ``inspect`` prints without quotes."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


def literals(text: str) -> str:
    """Turn RST ````literal```` spans into Markdown code spans."""
    return re.sub(r"``(.+?)``", r"`\1`", text, flags=re.DOTALL)


def code_block(lines: list[str]) -> list[str]:
    """A fenced block: a Python fragment when it compiles, else text."""
    source = "\n".join(lines).strip("\n")
    try:
        ast.parse(source)
    except SyntaxError:
        return ["```text", source, "```"]
    return ["<!-- fragment -->", "```python", source, "```"]


def paragraphs(lines: list[str]) -> list[str]:
    """Render docstring body lines: prose with literals converted, ``::`` blocks fenced."""
    out: list[str] = []
    prose: list[str] = []

    def flush() -> None:
        if prose:
            out.extend(literals("\n".join(prose)).splitlines())
            prose.clear()

    index = 0
    while index < len(lines):
        line = lines[index]
        if line.rstrip().endswith("::"):
            prose.append(line.rstrip()[:-1])
            flush()
            index += 1
            block: list[str] = []
            while index < len(lines) and (not lines[index].strip() or lines[index][:1] == " "):
                block.append(lines[index])
                index += 1
            out += ["", *code_block([b[4:] if b.startswith("    ") else b for b in block]), ""]
            continue
        prose.append(line)
        index += 1
    flush()
    return out


def entries(lines: list[str]) -> list[str]:
    """Render an ``Args:``-style section (``name: text`` with indented continuations)."""
    items: list[list[str]] = []
    for line in lines:
        if not line.strip():
            continue
        if line.startswith("    ") and items:
            items[-1].append(line.strip())
            continue
        name, _, text = line.strip().partition(":")
        items.append([f"`{name.strip()}`:", text.strip()])
    return [literals("- " + " ".join(part for part in item if part)) for item in items]


def docstring(obj: object) -> list[str]:
    """The Markdown lines of ``obj``'s own docstring."""
    doc = obj.__doc__ if isinstance(obj, type) else inspect.getdoc(obj)
    if not doc:
        return []
    lines = inspect.cleandoc(doc).splitlines()
    out: list[str] = []
    section: str | None = None
    body: list[str] = []

    def flush() -> None:
        nonlocal body
        if section is None:
            out.extend(paragraphs(body))
        else:
            dedented = [line[4:] if line.startswith("    ") else line.strip() for line in body]
            out.append(f"**{SECTIONS[section]}**")
            out.append("")
            out.extend(entries(dedented) if section in LISTED else paragraphs(dedented))
        out.append("")
        body = []

    for line in lines:
        heading = re.fullmatch(r"(\w+):", line.strip())
        if heading and heading[1] in SECTIONS and not line.startswith(" "):
            flush()
            section = heading[1]
            continue
        body.append(line)
    flush()
    return collapse(out)


def collapse(lines: list[str]) -> list[str]:
    """Drop repeated and trailing blank lines."""
    out: list[str] = []
    for line in lines:
        line = line.rstrip()
        if line or (out and out[-1]):
            out.append(line)
    while out and not out[-1]:
        out.pop()
    return out


def signature(fn: Callable[..., object], name: str, *, skip_self: bool = False) -> str:
    """``def name(...) -> ...: ...``, one parameter a line when it is long."""
    sig = inspect.signature(fn)
    params = []
    for param in sig.parameters.values():
        annotation = param.annotation
        if isinstance(annotation, str):
            annotation = _Annotation(annotation)
        default = param.default
        params.append(param.replace(annotation=annotation, default=default))
    ret = sig.return_annotation
    if isinstance(ret, str):
        ret = _Annotation(ret)
    if skip_self and params and params[0].name in ("self", "cls"):
        params = params[1:]
    text = str(sig.replace(parameters=params, return_annotation=ret))
    assert " at 0x" not in text, f"{name}: a default without a stable repr: {text}"
    prefix = "async def" if inspect.iscoroutinefunction(fn) else "def"
    one_line = f"{prefix} {name}{text}: ..."
    if len(one_line) <= WIDTH:
        return one_line
    inner, _, returns = text[1:].rpartition(")")
    parts = split_params(inner)
    return f"{prefix} {name}(\n" + "".join(f"    {p},\n" for p in parts) + f"){returns}: ..."


def split_params(inner: str) -> list[str]:
    """Split a parameter list at top-level commas."""
    parts, depth, current = [], 0, ""
    for char in inner:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current.strip())
    return parts


def indent(text: str) -> str:
    return "\n".join("    " + line if line else line for line in text.splitlines())


def fragment(source: str) -> list[str]:
    return ["<!-- fragment -->", "```python", source, "```"]


def base_name(base: object) -> str:
    """How a base class is written in a class statement."""
    if isinstance(base, type):
        if base.__module__ == "builtins":
            return base.__qualname__
        if base.__module__.startswith("ctxkit._"):
            return f"ctxkit.{base.__qualname__}"
        return f"{base.__module__}.{base.__qualname__}"
    return repr(base).replace("~", "").removeprefix("typing.")


def render_class(qualname: str, cls: type) -> Iterator[str]:
    yield f"### `{qualname}`"
    yield ""
    bases = ", ".join(
        base_name(base)
        for base in getattr(cls, "__orig_bases__", cls.__bases__)
        if base is not object
    )
    header = f"class {cls.__name__}({bases}):" if bases else f"class {cls.__name__}:"
    body: list[str] = []
    if issubclass(cls, enum.Enum):
        body = [f"{member.name} = {member.value!r}" for member in cls]
    elif dataclasses.is_dataclass(cls) or (
        "__init__" in vars(cls) and "Args:" in (cls.__doc__ or "")
    ):
        body = [signature(cls.__init__, "__init__")]
    yield from fragment(header + ("\n" + indent("\n".join(body)) if body else "\n    ..."))
    yield ""
    yield from docstring(cls)
    for name, member in vars(cls).items():
        if name.startswith("_") or issubclass(cls, enum.Enum):
            continue
        function = member.fget if isinstance(member, property) else member
        if isinstance(function, (staticmethod, classmethod)):
            function = function.__func__
        if not inspect.isfunction(function):
            continue
        yield ""
        yield f"#### `{qualname}.{name}`"
        yield ""
        source = signature(function, name)
        if isinstance(member, property):
            source = "@property\n" + source
        yield from fragment(source)
        lines = docstring(function)
        if lines:
            yield ""
            yield from lines


def render_module(module_name: str) -> Iterator[str]:
    module = importlib.import_module(module_name)
    names = [name for name in module.__all__ if name != "__version__"]
    yield f"## `{module_name}`"
    yield ""
    yield from docstring(module)
    yield ""
    yield "| name | summary |"
    yield "| --- | --- |"
    for name in names:
        anchor = re.sub(r"[^\w-]", "", f"{module_name}.{name}".lower())
        value = getattr(module, name)
        documented = inspect.isclass(value) or inspect.isfunction(value)
        summary = (docstring(value) or [""])[0] if documented else f"`{value!r}`"
        summary = summary.replace("|", r"\|")
        yield f"| [`{name}`](#{anchor}) | {summary} |"
    for name in names:
        value = getattr(module, name)
        qualname = f"{module_name}.{name}"
        yield ""
        if inspect.isclass(value) and not hasattr(value, "__origin__"):
            yield from render_class(qualname, value)
        elif inspect.isfunction(value):
            yield f"### `{qualname}`"
            yield ""
            yield from fragment(signature(value, name))
            yield ""
            yield from docstring(value)
        else:
            yield f"### `{qualname}`"
            yield ""
            yield from fragment(f"{name} = {value!r}")


def render() -> str:
    """The page: rendered from the docstrings, its code blocks formatted by ``ruff format``."""
    lines = [INTRO]
    for module_name in MODULES:
        lines += ["", *render_module(module_name)]
    page = "\n".join(collapse(lines)) + "\n"
    formatted = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--stdin-filename", str(PAGE), "-"],
        input=page,
        capture_output=True,
        text=True,
        check=True,
        cwd=PAGE.parent.parent,
    )
    return formatted.stdout


def main() -> int:
    PAGE.write_text(render(), encoding="utf-8")
    print(f"wrote {PAGE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
