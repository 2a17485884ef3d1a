"""The docs match the code: every config key is documented, and the Python examples run."""
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kdvfs_plugins.config import KdvfsConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
#: a block that needs a GPU or a user's own objects says so on its first line
SKIP_MARK = "# not run:"


def test_every_config_key_is_documented():
    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [f.name for f in dataclasses.fields(KdvfsConfig) if f"`{f.name}`" not in text]
    assert not missing, f"docs/configuration.md lacks {missing}"


def blocks():
    for doc in DOCS:
        for i, code in enumerate(BLOCK.findall(doc.read_text())):
            if not code.lstrip().startswith(SKIP_MARK):
                yield pytest.param(code, id=f"{doc.name}-{i}")


@pytest.mark.parametrize("code", list(blocks()))
def test_python_examples_in_the_docs_run(code, tmp_path):
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
