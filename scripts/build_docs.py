"""Build (check) the docs: README.md and docs/*.md, as GitHub renders them; there is no site generator.

    python scripts/build_docs.py              # every check; exit 1 on any warning
    python scripts/build_docs.py --no-run     # skip running the Python examples (links, syntax, API page only)
    python scripts/build_docs.py --update     # write the commands' output into their blocks (below)

Checks, each a warning that fails the build:

- every relative link resolves to a file in the repository, and every ``#anchor`` to a heading of
  the target page (GitHub's anchor rule);
- code fences are closed;
- every ```python block runs, in a fresh interpreter in a temporary directory, unless its first
  line is ``# not run: <why>`` (a sketch; skipped); README blocks are only compiled, as they show
  snippets of a user's own script;
- docs/api.md is what ``scripts/gen_api_docs.py`` generates from the code now;
- every block that names the command printing it is what that command prints now (below).

Figures and generated tables: a block between two HTML comments (invisible on GitHub) is the
output of the command the first one names::

    <!-- output of: kdvfs simulate --compare --markdown -->
    ...the command's output, exactly...
    <!-- end of output -->

The build runs each command once (however many blocks name it), in a temporary directory, two
commands at a time (``--jobs N``: N), and fails when a block differs from its output. ``kdvfs ...``
runs this checkout's ``kdvfs``, ``python ...`` this interpreter; an argument naming a file of the
repository is taken from the repository. ``python scripts/build_docs.py --update`` writes the
commands' output into the blocks.
"""
from __future__ import annotations

import argparse
import difflib
import re
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: a block that needs a GPU or a user's own objects says so on its first line (as tests/test_docs.py)
SKIP_MARK = "# not run:"
FENCE = re.compile(r"^(```|~~~)", re.M)
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
EXAMPLE_TIMEOUT_S = 300
#: A block of a command's output (see the module doc).
OUTPUT_BLOCK = re.compile(r"^<!-- output of: (?P<cmd>.+?) -->\n(?P<body>.*?)^<!-- end of output -->[ \t]*$",
                          re.S | re.M)
COMMAND_TIMEOUT_S = 600
#: Commands run side by side by default: they are independent (each in its own temporary directory).
DEFAULT_JOBS = 2


def pages() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def _rel(path: Path) -> str:
    return path.resolve().relative_to(ROOT).as_posix()


def strip_fences(text: str) -> str:
    """The text with fenced blocks blanked (a '#' line there is a comment, not a heading); line
    numbers are kept."""
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)


def strip_code(text: str) -> str:
    """The text with fenced blocks and inline code blanked (links there are examples, not links)."""
    return re.sub(r"`[^`\n]*`", "", strip_fences(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"[`*_]{1,2}(?=\S)|(?<=\S)[`*]{1,2}", "", text) if "`" in text or "*" in text else text
    s = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return s.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a page, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for h in HEADING.findall(strip_fences(path.read_text(encoding="utf-8"))):
        s = slug(h)
        n = seen.get(s, 0)
        out.add(s if n == 0 else f"{s}-{n}")
        seen[s] = n + 1
    return out


def check_links(path: Path) -> list[str]:
    warnings = []
    text = strip_code(path.read_text(encoding="utf-8"))
    for lineno, line in enumerate(text.splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{_rel(path)}:{lineno}"
            if not dest.exists():
                warnings.append(f"{where}: link to {target!r}: no such file")
            elif not dest.is_relative_to(ROOT):
                warnings.append(f"{where}: link to {target!r} leaves the repository")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                warnings.append(f"{where}: link to {target!r}: no heading with anchor #{anchor} in {_rel(dest)}")
            elif anchor and dest.is_dir():
                warnings.append(f"{where}: link to {target!r}: an anchor into a directory")
    return warnings


def check_fences(path: Path) -> list[str]:
    n = len(FENCE.findall(path.read_text(encoding="utf-8")))
    return [f"{_rel(path)}: {n} code fence markers; one is not closed"] if n % 2 else []


def python_blocks(path: Path) -> list[tuple[int, str]]:
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in PYTHON_BLOCK.finditer(text)]


def check_python(path: Path, run: bool) -> list[str]:
    warnings = []
    runs = run and path.parent.name == "docs"
    for lineno, code in python_blocks(path):
        where = f"{_rel(path)}:{lineno}"
        if code.lstrip().startswith(SKIP_MARK):
            continue  # a sketch (it may elide arguments with ...): said so on its first line
        try:
            compile(code, where, "exec")
        except SyntaxError as exc:
            warnings.append(f"{where}: python block does not compile: {exc}")
            continue
        if not runs:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                out = subprocess.run([sys.executable, "-c", code], cwd=tmp, capture_output=True, text=True,
                                     timeout=EXAMPLE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                warnings.append(f"{where}: python block ran past {EXAMPLE_TIMEOUT_S} s")
                continue
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
            warnings.append(f"{where}: python block failed (exit status {out.returncode}): {last} "
                            f"(mark it '{SKIP_MARK} <why>' if it cannot run here)")
    return warnings


def command_argv(command: str) -> list[str]:
    """The argv that runs a block's command: ``kdvfs`` and ``python`` from this interpreter, and
    arguments that name a file of the repository as that file."""
    argv = shlex.split(command)
    if not argv:
        raise ValueError("empty command")
    head = {"kdvfs": [sys.executable, "-m", "kdvfs_plugins.cli"], "python": [sys.executable]}.get(argv[0], argv[:1])
    return head + [str(ROOT / a) if not a.startswith("-") and (ROOT / a).is_file() else a for a in argv[1:]]


class CommandOutputs:
    """Each command's output, run once per build however many blocks name it."""

    def __init__(self):
        self._seen: dict[str, tuple[int, str, str]] = {}

    def __call__(self, command: str) -> tuple[int, str, str]:
        if command not in self._seen:
            self._seen[command] = self._run(command)
        return self._seen[command]

    def run_all(self, commands, jobs: int = DEFAULT_JOBS) -> None:
        """Run the commands not run yet, ``jobs`` at a time (each is a process of its own)."""
        todo = list(dict.fromkeys(c for c in commands if c not in self._seen))
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for command, result in zip(todo, pool.map(self._run, todo)):
                self._seen[command] = result

    @staticmethod
    def _run(command: str) -> tuple[int, str, str]:
        with tempfile.TemporaryDirectory() as tmp:  # plots and run directories go there, not into the checkout
            try:
                out = subprocess.run(command_argv(command), cwd=tmp, capture_output=True, text=True,
                                     timeout=COMMAND_TIMEOUT_S)
                return out.returncode, out.stdout, out.stderr
            except subprocess.TimeoutExpired:
                return -1, "", f"ran past {COMMAND_TIMEOUT_S} s"
            except (OSError, ValueError) as exc:
                return -1, "", str(exc)


def output_blocks(path: Path) -> list[tuple[int, str, str, re.Match]]:
    """(line number, command, block text, match) of every command-output block of a page."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group("cmd").strip(), m.group("body"), m)
            for m in OUTPUT_BLOCK.finditer(text)]


def block_commands(paths=None) -> list[str]:
    """Every command that a command-output block names, once each, in page order."""
    return list(dict.fromkeys(cmd for path in (pages() if paths is None else paths)
                              for _, cmd, _, _ in output_blocks(path)))


def check_outputs(path: Path, outputs: CommandOutputs, update: bool = False, only: str | None = None) -> list[str]:
    """Warnings for blocks that differ from their command's output (with ``update``: rewrite them);
    with ``only``, the blocks of that one command."""
    warnings = []
    text = path.read_text(encoding="utf-8")
    new_text, last = [], 0
    for lineno, command, body, m in output_blocks(path):
        if only is not None and command != only:
            continue
        where = f"{_rel(path)}:{lineno}"
        rc, stdout, stderr = outputs(command)
        if rc != 0:
            last_err = (stderr.strip().splitlines() or ["(no output)"])[-1]
            warnings.append(f"{where}: `{command}` failed (exit status {rc}): {last_err}")
            continue
        want, have = stdout.strip("\n"), body.strip("\n")
        if want == have:
            continue
        if update:
            new_text += [text[last:m.start("body")], want + "\n"]
            last = m.end("body")
            continue
        diff = [d for d in difflib.unified_diff(have.splitlines(), want.splitlines(), "docs", "output", n=0, lineterm="")
                if not d.startswith(("---", "+++", "@@"))]
        shown = "\n    ".join(diff[:12]) + ("\n    ..." if len(diff) > 12 else "")
        warnings.append(f"{where}: differs from the output of `{command}` (python scripts/build_docs.py --update "
                        f"writes it; - docs, + output):\n    {shown}")
    if update and new_text:
        path.write_text("".join(new_text) + text[last:], encoding="utf-8")
    return warnings


def check_api_page() -> list[str]:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_api_docs.py"), "--check"],
                         capture_output=True, text=True, cwd=ROOT)
    return [] if out.returncode == 0 else [f"docs/api.md: {out.stderr.strip().splitlines()[0]}"]


def build(run: bool = True, commands: bool = True, update: bool = False, jobs: int = DEFAULT_JOBS) -> list[str]:
    warnings = []
    outputs = CommandOutputs()
    if commands or update:
        outputs.run_all(block_commands(), jobs=jobs)
    for path in pages():
        warnings += check_fences(path) + check_links(path) + check_python(path, run)
        if commands or update:
            warnings += check_outputs(path, outputs, update=update)
    return warnings + check_api_page()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-run", action="store_true", help="compile the Python examples but do not run them")
    ap.add_argument("--no-commands", action="store_true",
                    help="do not run the commands of the command-output blocks (figures, generated tables)")
    ap.add_argument("--update", action="store_true",
                    help="write each command's output into its blocks instead of checking them")
    ap.add_argument("--jobs", type=int, default=DEFAULT_JOBS, metavar="N",
                    help=f"run N of those commands at a time (default {DEFAULT_JOBS})")
    args = ap.parse_args(argv)
    warnings = build(run=not args.no_run, commands=not args.no_commands, update=args.update, jobs=args.jobs)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if warnings:
        print(f"docs build failed: {len(warnings)} warning(s)", file=sys.stderr)
        return 1
    print(f"docs build ok: {len(pages())} pages, links, anchors, examples, command outputs and docs/api.md checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
