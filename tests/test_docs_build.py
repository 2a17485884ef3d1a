"""The docs build (scripts/build_docs.py) passes, the API page is current, and the checker catches
what it should."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_api_page_is_current():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_api_docs.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_api_page_covers_the_public_modules():
    text = (ROOT / "docs" / "api.md").read_text()
    for heading in ("## kdvfs_plugins.config", "## kdvfs_plugins.engine", "## kdvfs_plugins.hookspecs",
                    "## kdvfs_plugins.devices", "### class `KernelDVFS", "## kdvfs_deepspeed", "## kdvfs_megatron"):
        assert heading in text, heading
    assert " at 0x" not in text  # deterministic: no object addresses


def test_docs_build_without_warnings():
    """The docs build's links, anchors, fences, the examples' syntax and the API page. Its other checks
    are tests of their own, so that the test workers share them out: each command-output block
    below, one command per test, and running each example (tests/test_docs.py runs every
    ```python block of docs/*.md, as the build does)."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_docs.py"), "--no-commands", "--no-run"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "docs build ok" in out.stdout


#: Every command a block of README.md or docs/*.md names (test_figure_tables_name_the_commands_that_print_them
#: below makes sure the list is not empty).
BLOCK_COMMANDS = _script("build_docs").block_commands()


@pytest.mark.slow
@pytest.mark.parametrize("command", BLOCK_COMMANDS)
def test_docs_blocks_are_their_commands_output(command):
    """What ``python scripts/build_docs.py`` checks for each command: it is run now, and every
    block naming it, on any page, is its output."""
    bd = _script("build_docs")
    outputs = bd.CommandOutputs()
    warnings = [w for path in bd.pages() for w in bd.check_outputs(path, outputs, only=command)]
    assert warnings == [], "\n".join(warnings)


def test_checker_reports_broken_links_anchors_fences_and_examples(tmp_path, monkeypatch):
    bd = _script("build_docs")
    monkeypatch.setattr(bd, "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Some `code` section\n\ntext\n")
    page = tmp_path / "docs" / "b.md"
    page.write_text("# B\n\n[ok](a.md#some-code-section) [ok2](#b) [web](https://example.org)\n"
                    "[gone](missing.md) [bad anchor](a.md#nope) `[not a link](nowhere.md)`\n\n"
                    "```python\nraise SystemExit(3)\n```\n\n```python\n# not run: a sketch\nf(x=1, ...)\n```\n\n"
                    "```bash\nunclosed\n")
    warnings = bd.check_links(page) + bd.check_fences(page) + bd.check_python(page, run=True)
    text = "\n".join(warnings)
    assert "missing.md" in text and "#nope" in text
    assert "nowhere.md" not in text and "example.org" not in text and "some-code-section" not in text
    assert "not closed" in text
    assert "python block failed" in text and text.count("python block") == 1


def test_slugs_follow_github():
    bd = _script("build_docs")
    assert bd.slug("Energy and time per region: default vs planned") == "energy-and-time-per-region-default-vs-planned"
    assert bd.slug("kdvfs_plugins.config") == "kdvfs_pluginsconfig"
    assert bd.slug("A `code` heading") == "a-code-heading"


def test_a_block_that_names_its_command_is_checked_against_its_output(tmp_path, monkeypatch):
    bd = _script("build_docs")
    monkeypatch.setattr(bd, "ROOT", tmp_path)
    counter = tmp_path / "runs.txt"
    command = f"python -c \"open({str(counter)!r}, 'a').write('x'); print('| a | b |'); print('|---|---|'); print('| 1 | 2 |')\""
    page = tmp_path / "page.md"
    good = f"# P\n\n<!-- output of: {command} -->\n| a | b |\n|---|---|\n| 1 | 2 |\n<!-- end of output -->\n"
    page.write_text(good + "\nagain:\n\n" + good.replace("| 1 | 2 |\n<!--", "| 1 | 3 |\n<!--").split("\n", 2)[2])
    outputs = bd.CommandOutputs()
    warnings = bd.check_outputs(page, outputs)
    # the second block differs: one warning naming its line, the command and the differing figure
    assert len(warnings) == 1 and "page.md:11: differs from the output of" in warnings[0]
    assert "-| 1 | 3 |" in warnings[0] and "+| 1 | 2 |" in warnings[0]
    assert counter.read_text() == "x"  # run once for both blocks
    bd.check_outputs(page, outputs, update=True)
    assert page.read_text().count("\n| 1 | 2 |\n") == 2 and "| 1 | 3 |" not in page.read_text()
    assert not bd.check_outputs(page, outputs)
    page.write_text("<!-- output of: python -c \"raise SystemExit(3)\" -->\nx\n<!-- end of output -->\n")
    assert "failed (exit status 3)" in bd.check_outputs(page, bd.CommandOutputs())[0]


def test_the_build_runs_each_command_once_and_checks_one_commands_blocks_alone(tmp_path, monkeypatch):
    bd = _script("build_docs")
    monkeypatch.setattr(bd, "ROOT", tmp_path)
    counter = tmp_path / "runs.txt"

    def command(tag):
        return f"python -c \"open({str(counter)!r}, 'a').write('{tag}'); print('{tag}')\""

    page = tmp_path / "page.md"
    page.write_text("".join(f"<!-- output of: {command(t)} -->\n{t}\n<!-- end of output -->\n\n" for t in "aba"))
    assert bd.block_commands([page]) == [command("a"), command("b")]
    outputs = bd.CommandOutputs()
    outputs.run_all(bd.block_commands([page]), jobs=2)
    assert sorted(counter.read_text()) == ["a", "b"]
    assert bd.check_outputs(page, outputs) == []
    assert sorted(counter.read_text()) == ["a", "b"]  # not run again for the blocks
    page.write_text(page.read_text().replace("\nb\n", "\nc\n"))
    assert bd.check_outputs(page, outputs, only=command("a")) == []
    [warning] = bd.check_outputs(page, outputs, only=command("b"))
    assert "page.md:5: differs from the output of" in warning and "-c" in warning and "+b" in warning


def test_flag_table_of_megatron_md_comes_from_the_parser():
    bd = _script("build_docs")
    blocks = bd.output_blocks(ROOT / "docs" / "megatron.md")
    assert [cmd for _, cmd, _, _ in blocks] == ["python scripts/megatron_flags.py"]
    assert bd.check_outputs(ROOT / "docs" / "megatron.md", bd.CommandOutputs()) == []
    # every flag --help lists is in the table
    import argparse

    from kdvfs_megatron import add_kernel_dvfs_args

    table = blocks[0][2]
    for action in add_kernel_dvfs_args(argparse.ArgumentParser())._actions:
        for flag in action.option_strings:
            if flag.startswith("--kernel-dvfs"):
                assert f"`{flag}`" in table, flag


def test_figure_tables_name_the_commands_that_print_them():
    """The compare figures of docs/planner.md and README's "What it saves" are command blocks, so
    the docs build (test_docs_build_without_warnings) checks them against their commands' output."""
    bd = _script("build_docs")
    planner = [cmd for _, cmd, _, _ in bd.output_blocks(ROOT / "docs" / "planner.md")]
    assert "kdvfs simulate --compare --markdown" in planner
    readme = [cmd for _, cmd, _, _ in bd.output_blocks(ROOT / "README.md")]
    assert readme == ["python scripts/what_it_saves.py"]
