"""Print the table of kdvfs's Megatron flags, as the parser defines them (docs/megatron.md shows it).

    python scripts/megatron_flags.py            # Markdown
    python scripts/megatron_flags.py --text     # plain text
"""
from __future__ import annotations

import sys
from pathlib import Path

try:
    from kdvfs_megatron.args import flags_table
except ImportError:  # run from a checkout without the editable install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
    from kdvfs_megatron.args import flags_table

if __name__ == "__main__":
    print(flags_table().render("text" if "--text" in sys.argv[1:] else "markdown"))
