"""The kdvfsd wire protocol: one JSON object per line, each way, in order.

Requests are tiny and few kinds exist, so a line of JSON is enough and keeps the daemon easy to
audit (no framing state beyond "up to the next newline"). Every request gets exactly one answer,
in the order sent, so a client needs no request ids.

Requests::

    {"op": "hello"}
    {"op": "set", "gpu": "GPU-<uuid>", "sm_mhz": 1410, "mem_mhz": 2619}
    {"op": "reset", "gpu": "GPU-<uuid>"}      # unlock, keep ownership
    {"op": "release", "gpu": "GPU-<uuid>"}    # unlock, give the GPU back

Answers: ``{"ok": true, ...}`` or ``{"ok": false, "error": CODE, "message": "...", ...}``.
"""
from __future__ import annotations

import json

PROTOCOL_VERSION = 1
DEFAULT_SOCKET_PATH = "/run/kdvfsd.sock"
#: Environment variable that points kdvfs (and :class:`KdvfsdClient`) at the service.
SOCKET_ENV = "KDVFSD_SOCKET"
#: A longer line is not a kdvfsd request: the daemon drops the connection instead of buffering it,
#: whether the line arrives in pieces or whole.
MAX_LINE_BYTES = 1024
#: Brackets a request may hold: requests are flat objects, and a parser that recurses per level
#: must never see a deep one (1000 ``[`` fit in a line and exhaust Python's recursion limit).
MAX_BRACKETS = 4

OPS = ("hello", "set", "reset", "release")

# Error codes (the client maps each to a typed error).
E_BAD_REQUEST = "bad_request"
E_NOT_ALLOWED = "not_allowed"
E_BUSY = "busy"
E_RATE_LIMITED = "rate_limited"
E_UNKNOWN_GPU = "unknown_gpu"
E_INVALID_CLOCK = "invalid_clock"
E_NOT_SUPPORTED = "not_supported"
E_NO_PERMISSION = "no_permission"
E_DEVICE = "device_error"
E_TOO_MANY = "too_many_connections"

#: The commonest answer, sent and recognised as fixed bytes (no JSON work on the hot path).
OK_LINE = b'{"ok":true}\n'

_dumps = json.JSONEncoder(separators=(",", ":")).encode


def encode(message: dict) -> bytes:
    """One message as a line of compact JSON."""
    return _dumps(message).encode() + b"\n"


def set_request(gpu_uuid: str, sm_mhz: int, mem_mhz: int) -> bytes:
    # Formatted by hand: this is the request sent per clock change.
    return b'{"op":"set","gpu":%s,"sm_mhz":%d,"mem_mhz":%d}\n' % (
        json.dumps(gpu_uuid).encode(), int(sm_mhz), int(mem_mhz))


def gpu_request(op: str, gpu_uuid: str) -> bytes:
    return encode({"op": op, "gpu": gpu_uuid})


def error(code: str, message: str, **extra) -> bytes:
    return encode({"ok": False, "error": code, "message": message, **extra})


def parse_request(line: bytes) -> dict:
    """A request line as a JSON object with a string ``op``; ValueError for anything else.

    Bounded: the length and the nesting are checked before any parsing.
    """
    if len(line) > MAX_LINE_BYTES:
        raise ValueError(f"request longer than {MAX_LINE_BYTES} bytes")
    if line.count(b"[") + line.count(b"{") > MAX_BRACKETS:
        raise ValueError(f"more than {MAX_BRACKETS} brackets (nested too deep)")
    try:
        obj = json.loads(line)
    except RecursionError:  # unreachable past the bracket count; kept so no input can end the service
        raise ValueError("nested too deep") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("op"), str):
        raise ValueError('not a JSON object with a string "op"')
    return obj


def decode(line: bytes) -> dict:
    """A line as a JSON object; ValueError if it is not one."""
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("a kdvfsd message is a JSON object")
    return obj
