"""Issue 20, fuzzing: the kdvfsd protocol, the plan parser and both config parsers raise nothing
but the project's own errors, whatever they are fed."""
from __future__ import annotations

import copy
import json
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdvfs_plugins import KdvfsConfig, KdvfsError
from kdvfs_plugins.config import _CHECKS
from kdvfs_plugins.kdvfsd import protocol as P
from kdvfs_plugins.kdvfsd.config import ServiceConfigError, config_from_dict, load_config
from kdvfs_plugins.plan import Plan

from fakes.fake_nvml import FakeNvml
from test_hardening_kdvfsd import STRANGER, in_process, session
from test_hardening_plan_config import valid_plan
from test_kdvfsd import GPU0, GPU1, UID

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)
#: Values that broke parsers before (OverflowError, truncation, NUL bytes), drawn often.
edges = st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e308, 2**64, -1, 0, 1905.9, "1905", "", "\x00",
                         "1e400", "inf", [], {}, None, True, [1500.9, 1593.7], {"sm_mhz": 1e400, "mem_mhz": 2619}])
values = edges | json_values


# ---------------------------------------------------------------------- kdvfsd protocol
clock_values = st.integers(min_value=-5, max_value=200_000) | st.sampled_from([1410, 1395, 2619, 1593]) | scalars
requests = st.fixed_dictionaries(
    {"op": st.sampled_from(P.OPS) | st.text(max_size=6) | scalars},
    optional={"gpu": st.sampled_from([GPU0, GPU1, "GPU-fake", ""]) | scalars, "sm_mhz": clock_values,
              "mem_mhz": clock_values, "extra": json_values},
)
lines = (st.binary(max_size=1200)
         | requests.map(lambda r: json.dumps(r, allow_nan=True).encode())
         | st.integers(min_value=1, max_value=3000).map(lambda n: b"[" * n)
         | st.lists(requests.map(lambda r: json.dumps(r).encode()), max_size=5).map(b"\n".join))


def _answers_are_json_objects(out: bytes) -> None:
    for line in out.split(b"\n")[:-1]:
        answer = json.loads(line)
        assert isinstance(answer, dict) and isinstance(answer["ok"], bool)


@FUZZ
@given(line=lines, listed=st.booleans())
def test_fuzz_kdvfsd_requests_get_an_answer_and_nothing_raises(tmp_path_factory, line, listed):
    tmp = tmp_path_factory.mktemp("kdvfsd")
    with in_process(tmp, FakeNvml(gpus=2)) as server:
        s, peer = session(server, UID if listed else STRANGER)
        for part in line.split(b"\n"):
            _answers_are_json_objects(server._handle(s, part))
        # The same bytes through the reader: framing, the line cap, sends.
        s2, peer2 = session(server, UID if listed else STRANGER)
        peer2.setblocking(False)
        peer2.send(line + b"\n")
        server._on_readable(s2)
        for p in (peer, peer2):
            p.close()


# ---------------------------------------------------------------------- plans
def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


PLAN_PATHS = [p for p in _paths(valid_plan()) if p]


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(PLAN_PATHS), values), min_size=1, max_size=3))
def test_fuzz_plan_fields_raise_only_plan_errors(changes):
    d = copy.deepcopy(valid_plan())
    for path, value in changes:
        target = d
        try:
            for k in path[:-1]:
                target = target[k]
            target[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change replaced the parent
    try:
        Plan.from_dict(d)
    except KdvfsError:
        pass


@FUZZ
@given(raw=json_values | st.binary(max_size=300))
def test_fuzz_plan_files_raise_only_plan_errors(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("plan") / "p.json"
    path.write_bytes(raw if isinstance(raw, bytes) else json.dumps(raw, allow_nan=True).encode())
    try:
        Plan.load(path)
    except KdvfsError:
        pass


# ---------------------------------------------------------------------- configs
@FUZZ
@given(raw=st.dictionaries(st.sampled_from(sorted(_CHECKS)) | st.text(max_size=6), values, max_size=4))
def test_fuzz_kdvfs_config_raises_only_config_errors(raw):
    try:
        KdvfsConfig.from_dict(raw)
    except KdvfsError:
        pass


gpu_lists = st.lists(st.integers(min_value=-2, max_value=3) | st.sampled_from(["*", "GPU-fake", ""]) | edges, max_size=3)
service_configs = st.fixed_dictionaries({}, optional={
    "socket_path": values, "socket_mode": st.sampled_from(["0660", "0666", "x", "0o777", 432, -1, 2**40]) | values,
    "socket_group": values, "audit_log": values, "state_dir": values,
    "rate_limit": st.fixed_dictionaries({}, optional={"requests_per_s": values, "burst": values}) | values,
    "limits": st.fixed_dictionaries({}, optional={"connections_per_user": values, "connections": values}) | values,
    "restore_clocks": st.dictionaries(st.sampled_from(["*", "0", "GPU-x", "\x00", "²"]), values, max_size=2) | values,
    "users": st.dictionaries(st.sampled_from(["root", "0", "1001", "\x00", "²", "no-such-user-kdvfs"]),
                             gpu_lists | values, max_size=2) | values,
    "groups": st.dictionaries(st.sampled_from(["root", "0", "\x00"]), gpu_lists | values, max_size=2) | values,
    "unknown": values,
})


@FUZZ
@given(raw=service_configs)
def test_fuzz_kdvfsd_config_raises_only_service_config_errors(raw):
    try:
        config_from_dict(raw, "fuzz")
    except ServiceConfigError:
        pass


@FUZZ
@given(text=st.text(max_size=200) | st.integers(1, 5000).map(lambda n: "a = " + "[" * n) | json_values.map(json.dumps),
       suffix=st.sampled_from([".json", ".toml"]))
def test_fuzz_kdvfsd_config_files_raise_only_service_config_errors(tmp_path_factory, text, suffix):
    path = tmp_path_factory.mktemp("cfg") / f"kdvfsd{suffix}"
    path.write_text(text)
    try:
        load_config(path)
    except ServiceConfigError:
        pass


def test_fuzz_helpers_build_a_working_session(tmp_path):
    # The fuzzed session is a real one: a valid request is served.
    with in_process(tmp_path, FakeNvml(gpus=2)) as server:
        s, peer = session(server)
        assert server._handle(s, P.set_request(GPU0, 1410, 2619).rstrip(b"\n")) == P.OK_LINE
        assert isinstance(peer, socket.socket)
