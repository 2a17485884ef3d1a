"""Round trip of a clock request through kdvfsd: client -> Unix socket -> service -> NVML -> answer.

Starts a real kdvfsd process on a fake NVML (``tests/fakes/fake_nvml.py``) and a socket in a
temporary folder, sends 10 000 ``set_clocks`` requests on one connection (alternating SM clocks,
so that every request reaches NVML), and prints the median and p99 round trip. The fake's NVML
calls cost about a microsecond in memory, so the figure is the service's own overhead; on a real
GPU add the driver's time for ``nvmlDeviceSetGpuLockedClocks``. ``--fake-state-file`` keeps the
fake GPU in a JSON file instead (as the tests do): then each request also rewrites that file.

Run: ``python benchmarks/bench_kdvfsd.py [--requests 10000] [--fake-state-file]``. Asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAKES = ROOT / "tests" / "fakes"
sys.path.insert(0, str(ROOT))

from kdvfs_plugins.kdvfsd import KdvfsdClient, ServiceNotRunningError  # noqa: E402

# The service process: the fake NVML in memory, or the pynvml shim on a state file.
LAUNCH_IN_MEMORY = (
    "import sys; sys.path.insert(0, {fakes!r}); from fake_nvml import FakeNvml; "
    "from kdvfs_plugins.kdvfsd.server import main; sys.exit(main(['--config', {cfg!r}], nvml=FakeNvml(gpus=1)))"
)


def start_service(tmp: Path, fake_state_file: bool) -> tuple[subprocess.Popen, str]:
    sock = str(tmp / "kdvfsd.sock")
    cfg = tmp / "kdvfsd.json"
    cfg.write_text(json.dumps({
        "socket_path": sock, "audit_log": str(tmp / "audit.log"), "state_dir": str(tmp / "state"),
        # The benchmark sends as fast as it can: far above any real training's switching rate.
        "rate_limit": {"requests_per_s": 1e9, "burst": 1_000_000},
        "users": {str(os.getuid()): ["*"]},
    }))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if fake_state_file:
        env.update(PYTHONPATH=os.pathsep.join([str(FAKES / "pynvml_shim"), str(ROOT)]),
                   FAKE_NVML_STATE=str(tmp / "fake.json"))
        cmd = [sys.executable, "-m", "kdvfs_plugins.kdvfsd", "--config", str(cfg)]
    else:
        cmd = [sys.executable, "-c", LAUNCH_IN_MEMORY.format(fakes=str(FAKES), cfg=str(cfg))]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            KdvfsdClient(sock, timeout_s=1).hello()
            return proc, sock
        except ServiceNotRunningError:
            if proc.poll() is not None:
                break
            time.sleep(0.02)
    proc.kill()
    raise SystemExit(f"kdvfsd did not start:\n{proc.communicate(timeout=10)[1]}")


def stop_service(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--fake-state-file", action="store_true", help="keep the fake GPU in a JSON file (slow fake)")
    ap.add_argument("--same-cpu", type=int, default=None, metavar="N",
                    help="pin the service and this client to CPU N: measures the service's own cost without "
                         "the machine's cross-core wake-up (on a small virtual machine that wake-up alone "
                         "can exceed 100 us per hop)")
    args = ap.parse_args()
    if args.same_cpu is not None:
        os.sched_setaffinity(0, {args.same_cpu})  # inherited by the service process started below
    with tempfile.TemporaryDirectory() as d:
        proc, sock = start_service(Path(d), args.fake_state_file)
        try:
            client = KdvfsdClient(sock)
            gpu = client.hello().gpus[0]
            for i in range(200):  # warm up: connection, claim, caches
                client.set_clocks(gpu, 1410 if i % 2 else 1395, 2619)
            rtt_ns = []
            clock = time.perf_counter_ns
            for i in range(args.requests):
                sm = 1410 if i % 2 else 1395
                t0 = clock()
                client.set_clocks(gpu, sm, 2619)
                rtt_ns.append(clock() - t0)
            t0 = clock()
            client.hello()
            hello_us = (clock() - t0) / 1e3
            client.close()
        finally:
            stop_service(proc)
    rtt_us = sorted(x / 1e3 for x in rtt_ns)
    p99 = rtt_us[min(len(rtt_us) - 1, int(round(0.99 * len(rtt_us))) - 1)]
    fake = "fake NVML in a state file" if args.fake_state_file else "fake NVML in memory"
    where = f", service and client on CPU {args.same_cpu}" if args.same_cpu is not None else ""
    print(f"kdvfsd set_clocks round trip over {len(rtt_us)} requests ({fake}, one connection{where}):")
    print(f"  median {statistics.median(rtt_us):.1f} us   p99 {p99:.1f} us   "
          f"mean {statistics.fmean(rtt_us):.1f} us   max {rtt_us[-1]:.1f} us")
    print(f"  one hello: {hello_us:.1f} us")


if __name__ == "__main__":
    main()
