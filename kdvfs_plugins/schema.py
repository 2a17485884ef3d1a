"""The JSON Schema of the ``kernel_dvfs`` block, generated from the configuration schema.

:mod:`kdvfs_plugins.config` stays the one schema: its fields give the keys, types and defaults,
its value checks the allowed values (enumerations and ranges), and the ``#:`` comments above the
fields the descriptions. The generated file ships as ``kdvfs_plugins/data/kernel_dvfs.schema.json``
so that an editor can check the block of a DeepSpeed config (docs/configuration.md says how)::

    python -m kdvfs_plugins.schema            # print the schema
    python -m kdvfs_plugins.schema --write    # regenerate the shipped file

The JSON Schema is for editors; :meth:`KdvfsConfig.from_dict` still validates every run, with its
did-you-mean errors and the rules across keys (``sm_mhz`` with ``mem_mhz``, strict without
slowdown) that the schema states only in descriptions.
"""
from __future__ import annotations

import inspect
import json
import re
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from . import config as _config
from .config import KdvfsConfig

SCHEMA_FILE = Path(__file__).resolve().parent / "data" / "kernel_dvfs.schema.json"

_CLOCK_MHZ = {"type": "integer", "minimum": 1, "maximum": 100000}
#: Values of the checks that are plain functions (the enumerations and ranges carry their own).
_BY_CHECK = {
    "_bool": {"type": "boolean"},
    "_str": {"type": "string", "minLength": 1},
    "_optional_str": {"type": ["string", "null"], "minLength": 1},
    "_region_clocks": {
        "type": "object",
        "propertyNames": {"pattern": "^[^/]+(/.*)?$"},
        "additionalProperties": {"anyOf": [
            {"type": "object", "properties": {"sm_mhz": _CLOCK_MHZ, "mem_mhz": _CLOCK_MHZ},
             "required": ["sm_mhz", "mem_mhz"], "additionalProperties": False},
            {"type": "array", "items": _CLOCK_MHZ, "minItems": 2, "maxItems": 2},
        ]},
    },
    "_module_depth": {"anyOf": [{"const": "auto"}, {"type": "integer", "minimum": 1, "maximum": 64}]},
    "_progress": {"anyOf": [{"const": "auto"}, {"type": "boolean"}]},
}
#: Checks written inline in the config (a lambda has no name to look up).
_BY_KEY = {"objective": {"enum": [*_config.OBJECTIVES, None]}}
_TOGETHER = {"sm_mhz": "Set together with mem_mhz, or neither.", "mem_mhz": "Set together with sm_mhz, or neither."}


def _descriptions() -> dict[str, str]:
    """Each field's ``#:`` comment in config.py (the same text the API reference shows)."""
    out, pending = {}, []
    for line in inspect.getsource(KdvfsConfig).splitlines():
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
            continue
        m = re.match(r"^(\w+)\s*:", text)
        if m and pending:
            out[m.group(1)] = " ".join(pending)
        pending = [] if not text.startswith("#") else pending
    return out


def _value_schema(name: str) -> dict:
    if name in _BY_KEY:
        return dict(_BY_KEY[name])
    check = _config._CHECKS[name]
    own = getattr(check, "json_schema", None)
    if own is not None:
        return json.loads(json.dumps(own))  # a copy
    try:
        return json.loads(json.dumps(_BY_CHECK[check.__name__]))
    except KeyError:
        raise LookupError(f"config key {name!r}: its check {check!r} has no JSON Schema; add it to "
                          "kdvfs_plugins/schema.py (_BY_CHECK or _BY_KEY)") from None


def kernel_dvfs_schema() -> dict:
    """The JSON Schema (draft 2020-12) of the ``kernel_dvfs`` block, from the config schema."""
    descriptions = _descriptions()
    props = {}
    for f in fields(KdvfsConfig):
        prop = _value_schema(f.name)
        text = " ".join(t for t in (descriptions.get(f.name), _TOGETHER.get(f.name)) if t)
        if text:
            prop["description"] = text
        if f.default is not MISSING:
            default = f.default
            prop["default"] = default
        props[f.name] = prop
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "kdvfs: the kernel_dvfs block of a DeepSpeed config",
        "description": "kdvfs settings (docs/configuration.md). Generated from kdvfs_plugins/config.py by "
                       "python -m kdvfs_plugins.schema; kdvfs validates the block again when it starts.",
        "type": "object",
        "properties": props,
        "additionalProperties": False,
    }


def schema_text() -> str:
    return json.dumps(kernel_dvfs_schema(), indent=2) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--write" in argv:
        SCHEMA_FILE.write_text(schema_text())
        print(f"wrote {SCHEMA_FILE}")
    else:
        sys.stdout.write(schema_text())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
