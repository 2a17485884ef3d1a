"""The package's layering: sim/ is the virtual hardware below the core; one home per concept."""
import ast
import re
from pathlib import Path

import kdvfs_plugins

PKG = Path(kdvfs_plugins.__file__).parent
#: what the virtual hardware must not import: the product's live path and the studies above it
ABOVE_SIM = {"engine", "meter", "explore", "planner", "studies", "policy", "actuator", "pipeline_planner"}


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level >= 2 or mod.startswith("kdvfs_plugins"):
                out.add(mod.replace("kdvfs_plugins.", "").split(".")[0])
        elif isinstance(node, ast.Import):
            out.update(a.name.replace("kdvfs_plugins.", "").split(".")[0] for a in node.names
                       if a.name.startswith("kdvfs_plugins"))
    return out


def test_nothing_under_sim_imports_the_engine_meter_explorer_planner_or_a_study():
    offenders = {}
    for path in sorted((PKG / "sim").glob("*.py")):
        bad = {m for m in imported_modules(path) if m in ABOVE_SIM or m.startswith("explore")}
        if bad:
            offenders[path.name] = sorted(bad)
    assert offenders == {}


def test_the_default_switch_latency_is_defined_once():
    pattern = re.compile(r"^\s*DEFAULT_SWITCH_LATENCY_MS\s*(:[^=]*)?=", re.M)
    homes = [p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if pattern.search(p.read_text())]
    assert homes == ["switching.py"]
    # and no module writes the figure itself as a default latency
    literal = re.compile(r"switch_latency_ms\s*(:\s*float)?\s*=\s*6(\.0)?\b")
    assert [p.name for p in PKG.rglob("*.py") if literal.search(p.read_text())] == []
