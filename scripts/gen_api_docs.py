"""Generate docs/api.md, the API reference, from the public modules' docstrings.

    python scripts/gen_api_docs.py           # rewrite docs/api.md
    python scripts/gen_api_docs.py --check   # exit 1 if docs/api.md is not what the code gives

Public names: a module's ``__all__`` where it has one, else the classes and functions defined in
it whose names do not start with ``_``. The output is deterministic (no object addresses, sorted
where the source order is not meaningful), so that the check can compare text.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"

#: (module, names to document or None for all public names), in page order.
MODULES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("kdvfs_plugins.config", None),
    ("kdvfs_plugins.clocks", None),
    ("kdvfs_plugins.errors", None),
    ("kdvfs_plugins.engine", None),
    ("kdvfs_plugins.plan", None),
    ("kdvfs_plugins.planner", None),
    ("kdvfs_plugins.hookspecs", None),
    ("kdvfs_plugins.events", None),
    ("kdvfs_plugins.devices", None),
    ("kdvfs_lightning", ("KernelDVFS",)),
    ("kdvfs_deepspeed", None),
    ("kdvfs_megatron", None),
)

HEADER = """# API reference

Generated from the docstrings by `python scripts/gen_api_docs.py`; do not edit by hand
(`python scripts/build_docs.py` fails when this page is out of date). The user-facing entry points
are the [configuration](configuration.md), the Lightning callback, the DeepSpeed block and the
Megatron flags; the rest is for plugin authors and tools.
"""


def _clean(text: str) -> str:
    """Docstring markup (reST roles, double backticks) as Markdown."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", lambda m: f"`{m.group(1).split('.')[-1] if m.group(0)[m.group(0).index('`') + 1] == '~' else m.group(1)}`", text)
    text = text.replace("``", "`")
    # reST section underlines would turn the line above into a Markdown heading; keep it as text
    return re.sub(r"^\s*([-=~^])\1{2,}\s*$", "", text, flags=re.M)


def _signature(obj, method: bool = False) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    sig = re.sub(r" at 0x[0-9a-fA-F]+", "", sig)
    # Postponed annotations (from __future__ import annotations) come back as strings: unquote them.
    sig = re.sub(r"(\w): '([^']*)'", r"\1: \2", sig)
    sig = re.sub(r"-> \"'(.*)'\"$|-> '(.*)'$", lambda m: "-> " + (m.group(1) or m.group(2)), sig)
    if method:
        sig = re.sub(r"^\((self|cls)(, )?", "(", sig)
    return sig


def _doc(obj) -> str:
    doc = inspect.getdoc(obj)
    if inspect.isclass(obj) and doc and doc.startswith(f"{obj.__name__}("):
        doc = None  # the signature dataclasses put where a docstring is missing: already in the heading
    return _clean(doc) if doc else ""


def public_names(module, only) -> list[str]:
    if only is not None:
        return list(only)
    if hasattr(module, "__all__"):
        return list(module.__all__)
    names = [n for n, obj in vars(module).items() if not n.startswith("_")
             and (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == module.__name__]
    return sorted(names)


def _members(cls) -> list[tuple[str, object]]:
    """Public methods and properties defined in the class itself (inherited ones are documented
    where they are defined), in source order."""
    out = []
    for name, obj in vars(cls).items():
        if name.startswith("_") or name in getattr(cls, "__dataclass_fields__", {}):
            continue
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        if inspect.isfunction(obj) or isinstance(obj, property):
            out.append((name, obj))
    return out


def document_class(qualname: str, cls) -> list[str]:
    lines = [f"### class `{qualname}{_signature(cls)}`", "", _doc(cls), ""]
    for name, member in _members(cls):
        head = f"- **`{name}`** (property)" if isinstance(member, property) else \
            f"- **`{name}{_signature(member, method=True)}`**"
        summary = _first_paragraph(member)
        lines.append(f"{head}: {summary}" if summary else head)
    if lines[-1] != "":
        lines.append("")
    return lines


def _first_paragraph(obj) -> str:
    # The member's own docstring only: one inherited from a framework's base class (Lightning's
    # Callback) says nothing about kdvfs and changes with the framework's version.
    doc = inspect.cleandoc(obj.__doc__) if obj.__doc__ else None
    return " ".join(_clean(doc).split("\n\n")[0].split()) if doc else ""


def document_module(name: str, only) -> list[str]:
    module = importlib.import_module(name)
    lines = [f"## {name}", "", _doc(module), ""]
    for n in public_names(module, only):
        obj = getattr(module, n)
        if inspect.isclass(obj):
            lines += document_class(n, obj)
        elif callable(obj):
            lines += [f"### `{n}{_signature(obj)}`", "", _doc(obj), ""]
    return lines


def generate() -> str:
    lines = [HEADER, "## Contents", ""]
    lines += [f"- [{name}](#{_slug(name)})" for name, _ in MODULES]
    lines.append("")
    for name, only in MODULES:
        lines += document_module(name, only)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading (the rule scripts/build_docs.py checks links against)."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with docs/api.md instead of writing it")
    args = ap.parse_args(argv)
    text = generate()
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            diff = "".join(list(difflib.unified_diff(current.splitlines(True), text.splitlines(True), "docs/api.md",
                                                     "generated"))[:40])
            print(f"docs/api.md is out of date; run python scripts/gen_api_docs.py\n{diff}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
