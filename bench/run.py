#!/usr/bin/env python3
"""pgtenant benchmark harness (issues 7 and 17).

One command, `python3 bench/run.py`, builds pgtenant (unless --no-build), installs what is missing
(PgBouncer, pgbench, strace, openssl, valgrind) with apt-get, starts a throwaway Postgres cluster with
the RLS fixture, a 1,000,000-row table and a write table, and measures pgtenant against PgBouncer's
best same-work configuration and a direct connection:

  pgbench       read mix: TPS, latency, proxy CPU (user/system) per transaction, per pgbench mode
  writes        write mix (INSERT ... RETURNING with a nextval default + UPDATE ... RETURNING in one
                transaction): the same figures
  roundtrips    backend round trips and proxy I/O syscalls per transaction (strace)
  instructions  proxy instructions per transaction (perf stat when the CPU exposes counters, else
                callgrind on a fixed number of rate-limited transactions)
  login         new connections per second with JWT verification (HS256, RS256) vs PgBouncer
  idle          10,000 logged-in idle clients: proxy RSS
  active        2,000 clients running queries on a pool of 20: errors, latency

Everything runs in a temporary directory that is removed at exit (also on Ctrl-C). Results are printed
and written to bench/results/<UTC timestamp>.json and bench/results/latest.json.
See bench/README.md. Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import datetime
import glob
import hashlib
import hmac
import json
import math
import os
import platform
import pwd
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
RESULTS_DIR = BENCH_DIR / "results"
FIXTURE = REPO / "tests" / "fixtures" / "rls.sql"

SCRIPT_CTX = BENCH_DIR / "select_ctx.sql"     # BEGIN; set_config(...); SELECT ...; END;  (4 round trips)
SCRIPT_SAME = BENCH_DIR / "select_same.sql"   # SELECT set_config(...) \; SELECT ...        (one Query)
SCRIPT_SELECT = BENCH_DIR / "select.sql"      # SELECT ... WHERE id = :id;
SCRIPT_LOGIN = BENCH_DIR / "login.sql"        # SELECT 1;
SCRIPT_W_SAME = BENCH_DIR / "write_same.sql"  # BEGIN \; set_config \; INSERT \; UPDATE \; COMMIT  (one Query)
SCRIPT_W_1Q = BENCH_DIR / "write_1q.sql"      # BEGIN \; INSERT \; UPDATE \; COMMIT               (one Query)
SCRIPT_W_TX = BENCH_DIR / "write.sql"         # BEGIN; INSERT ...; UPDATE ...; END;           (4 round trips)
SCRIPT_W_PIPE = BENCH_DIR / "write_pipeline.sql"  # the same 4 statements as one pipeline       (1 round trip)

TENANTS = 100
APP_USER, APP_PASSWORD = "app_user", "app-secret"          # from tests/fixtures/rls.sql
BOUNCER_USER, BOUNCER_PASSWORD = "bench", "bench-secret"   # PgBouncer's client-side login
CLIENT_USER = "bench"                                      # user name clients give pgtenant
LOOKUP_SQL = "SELECT id, tenant_id, val, note FROM bench WHERE id = {id}"

# Rows of the pgbench and writes parts.
ROW_DIRECT8 = "direct (8 connections)"      # the ceiling for a pool of 8
ROW_BOUNCER_SAME = "pgbouncer same-query"   # context in the same simple Query (simple protocol)
ROW_BOUNCER_CQ = "pgbouncer connect_query"  # a per-tenant database whose connections ran connect_query
ROW_PGTENANT = "pgtenant"
ROW_BOUNCER_CTX = "pgbouncer+set_config"    # BEGIN; set_config; SELECT; END; (4 round trips)
ROW_DIRECT = "direct (64 connections)"      # one backend per client, select_ctx.sql (4 round trips)
ROW_BOUNCER_PLAIN = "pgbouncer plain"       # no context at all (RLS returns no row), --extra-rows only
# --sched-batch: the same proxy process and row, its threads switched to SCHED_BATCH for the run
BATCH = " (SCHED_BATCH)"
ROW_FLEET = "pgtenant, {n} processes (so_reuseport)"
ROW_BOUNCER_FLEET = "{row}, {n} processes (so_reuseport)"
# kernel tracepoints counted per transaction when perf can count them (no CPU counters needed)
TRACEPOINTS = {"raw_syscalls:sys_enter": "syscalls_per_tx", "syscalls:sys_enter_futex": "futex_per_tx",
               "syscalls:sys_enter_epoll_wait": "epoll_waits_per_tx"}
MODES = ["simple", "extended", "prepared"]
MIXES = ["read", "write"]

# Targets (issue 17): against PgBouncer's best same-work configuration.
TARGET_TPS = {"simple": 1.05, "extended": 1.05, "prepared": 1.25}
TARGET_CPU = 0.90          # pgtenant CPU per transaction / PgBouncer's, simple and extended
TARGET_WRITE_DRIFT = 0.05  # |write-mix ratio / read-mix ratio - 1|
# Earlier targets (issue 7), against the weaker 4-round-trip baseline: still reported.
TARGET_VS_BOUNCER_CTX = 1.10   # pgtenant TPS / pgbouncer+set_config TPS
TARGET_VS_DIRECT = 0.80        # pgtenant TPS / direct (64 connections) TPS
TARGET_IDLE_MIB = 150.0    # proxy RSS with 10,000 idle clients
IDLE_TARGET_CLIENTS = 10_000

PARTS = ["pgbench", "writes", "roundtrips", "instructions", "login", "idle", "active"]


class BenchError(Exception):
    """A failure with a message meant for the user (no traceback)."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# small helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_signing_input(alg: str, claims: dict) -> bytes:
    header = {"alg": alg, "typ": "JWT"}
    return (b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
            + b64url(json.dumps(claims, separators=(",", ":")).encode())).encode()


def claims_for(tenant: int, ttl: int = 7200) -> dict:
    now = int(time.time())
    return {"tenant_id": tenant, "sub": "bench", "iat": now, "exp": now + ttl}


def mint_hs256(secret: str, tenant: int) -> str:
    signing = jwt_signing_input("HS256", claims_for(tenant))
    sig = hmac.new(secret.encode(), signing, hashlib.sha256).digest()
    return signing.decode() + "." + b64url(sig)


def mint_rs256(openssl: str, key_pem: Path, tenant: int) -> str:
    signing = jwt_signing_input("RS256", claims_for(tenant))
    res = subprocess.run([openssl, "dgst", "-sha256", "-sign", str(key_pem)], input=signing,
                         capture_output=True, timeout=30)
    if res.returncode != 0:
        raise BenchError(f"openssl dgst -sign failed: {res.stderr.decode(errors='replace').strip()}")
    return signing.decode() + "." + b64url(res.stdout)


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_split(pid) -> tuple[float, float]:
    """(utime, stime) of the whole process (all threads, exited ones included), in seconds; summed
    over the processes when `pid` is a list."""
    if isinstance(pid, list):
        splits = [proc_cpu_split(p) for p in pid]
        return sum(u for u, _ in splits), sum(k for _, k in splits)
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    return sum(proc_cpu_split(pid))


def proc_ctx_switches(pid) -> int:
    """Voluntary + involuntary context switches, summed over the process's current threads (and over
    the processes when `pid` is a list)."""
    if isinstance(pid, list):
        return sum(proc_ctx_switches(p) for p in pid)
    total = 0
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(status) as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                        total += int(line.split()[1])
        except OSError:
            pass   # a thread that just exited
    return total


def cpu_snapshot() -> tuple[int, int, int]:
    """(busy ticks of the whole machine, ticks used by this process tree, monotonic ns).

    This process tree = this script, every live descendant (with the children it has reaped: Postgres
    backends that exited) and the children this script has reaped (pgbench runs). The difference of
    two snapshots tells how much CPU other work on the machine took meanwhile."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = sum(v[:8]) - v[3] - v[4]          # all but idle and iowait (guest time is inside user)
    me = os.getpid()
    parent, times = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2:].split()
        parent[int(d)] = int(fields[1])
        times[int(d)] = sum(int(x) for x in fields[11:15])      # utime stime cutime cstime
    ours = 0
    for pid in times:
        q, depth = pid, 0
        while q > 1 and q != me and depth < 64:
            q, depth = parent.get(q, 0), depth + 1
        if q == me:
            ours += times[pid]
    ru_self, ru_children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    ours += round((ru_self.ru_utime + ru_self.ru_stime + ru_children.ru_utime + ru_children.ru_stime) * CLK_TCK)
    return busy, ours, time.monotonic_ns()


def other_cpu_pct(before: tuple[int, int, int], after: tuple[int, int, int]) -> float | None:
    """CPU that work outside this benchmark used between two snapshots, in % of all the machine's CPUs."""
    wall = (after[2] - before[2]) / 1e9
    if wall <= 0:
        return None
    other = (after[0] - before[0]) - (after[1] - before[1])
    return round(max(other, 0) / CLK_TCK / (wall * (os.cpu_count() or 1)) * 100, 1)


def proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, math.ceil(p / 100.0 * len(sorted_values)) - 1))   # nearest rank
    return sorted_values[k]


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def clean_env(**extra: str) -> dict:
    """The environment without PG* variables (PGHOST, PGSERVICE, PGOPTIONS … would interfere)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            try:
                total += float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return total


def histogram_quantile(text: str, name: str, q: float) -> float | None:
    """Estimate of quantile q of a Prometheus histogram (linear within the bucket, like PromQL)."""
    buckets = []
    for line in text.splitlines():
        m = re.match(re.escape(name) + r'_bucket\{(?:.*,)?le="([^"]+)"(?:,.*)?\} ([\d.e+]+)$', line)
        if m:
            le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
            buckets.append((le, float(m.group(2))))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_count) / (count - prev_count) if count > prev_count else 1)
        prev_le, prev_count = le, count
    return None


def fmt(v, spec: str = ".2f", none: str = "-") -> str:
    if v is None:
        return none
    if isinstance(v, str):
        return v
    return format(v, spec)


def table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    right = right if right is not None else set(range(1, len(headers)))
    widths = [max(len(str(x)) for x in [h] + [r[i] for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(str(c).rjust(widths[i]) if i in right else str(c).ljust(widths[i])
                         for i, c in enumerate(cells)).rstrip()
    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# processes


class Proc:
    """A child process we started; stopped (and reaped) by stop()."""

    def __init__(self, name: str, popen: subprocess.Popen, log_path: Path, stop_signal=signal.SIGTERM):
        self.name, self.popen, self.log_path, self.stop_signal = name, popen, log_path, stop_signal

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is not None:
            return
        try:
            self.popen.send_signal(self.stop_signal)
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.is_root = os.geteuid() == 0
        self.procs: list[Proc] = []
        self.tmp: Path | None = None
        self.results: dict = {}
        self.tools: dict[str, str] = {}
        self.pg_uid = self.pg_gid = None
        self.pgport = 0
        self.secret = b64url(os.urandom(32))
        self.maxk = args.rows // TENANTS - 1
        self.tenant = args.tenant
        self.pgtenant_bin: Path | None = None
        self.pgtenant_main: Proc | None = None
        self.fleet: list[Proc] = []    # --reuseport-processes: processes sharing one port
        self.fleet_port = 0
        self.bouncer_fleet: list[Proc] = []
        self.bouncer_fleet_port = 0
        self.pgtenant_main_port = 0
        self.pgtenant_main_admin = 0
        self.bouncer: Proc | None = None
        self.bouncer_port = 0
        self.token = ""
        self.perf_ok = False
        self.perf_reason: str | None = None
        self.trace_ok = False     # perf can count the kernel tracepoints (TRACEPOINTS)
        # preloaded rows of bench_write (ids 1 .. write_rows), when the writes part runs
        self.write_rows = getattr(args, "write_rows", 0) or 0
        self.wmaxk = max(self.write_rows // TENANTS - 1, 0)

    # ---------------------------------------------------------------- setup

    def sudo(self) -> list[str]:
        if self.is_root:
            return []
        if shutil.which("sudo"):
            return ["sudo"]
        raise BenchError("not root and no sudo: install the missing packages by hand")

    def apt_install(self, pkgs: list[str]) -> None:
        if not pkgs:
            return
        if not shutil.which("apt-get"):
            raise BenchError(f"missing {', '.join(pkgs)} and no apt-get to install them")
        log(f"installing with apt-get: {' '.join(pkgs)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (self.sudo() + ["apt-get", "update", "-qq"],
                    self.sudo() + ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-qq"]
                    + pkgs):
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if res.returncode != 0:
                raise BenchError(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")

    @staticmethod
    def pg_bindir() -> str | None:
        def version(p: str) -> float:
            m = re.search(r"/postgresql/([\d.]+)/bin", p)
            return float(m.group(1)) if m else 0.0
        for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
            if os.access(os.path.join(d, "initdb"), os.X_OK):
                return d
        if shutil.which("pg_config"):
            res = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10)
            d = res.stdout.strip()
            if res.returncode == 0 and os.access(os.path.join(d, "initdb"), os.X_OK):
                return d
        initdb = shutil.which("initdb")
        return os.path.dirname(initdb) if initdb else None

    def find_tool(self, name: str, bindir: str | None) -> str | None:
        if bindir and os.access(os.path.join(bindir, name), os.X_OK):
            return os.path.join(bindir, name)
        found = shutil.which(name)
        if found:
            return found
        for d in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
            if os.access(os.path.join(d, name), os.X_OK):
                return os.path.join(d, name)
        return None

    def ensure_tools(self) -> None:
        parts = set(self.args.parts)
        want = {"initdb": "postgresql", "postgres": "postgresql", "pg_isready": "postgresql",
                "psql": "postgresql-client", "pgbench": "postgresql-contrib"}
        if parts & {"pgbench", "writes", "roundtrips", "instructions", "login"}:
            want["pgbouncer"] = "pgbouncer"
        if "roundtrips" in parts:
            want["strace"] = "strace"
        if self.args.sched_batch:
            want["chrt"] = "util-linux"
        if "login" in parts:
            want["openssl"] = "openssl"
        if parts & {"pgbench", "writes", "instructions"}:
            self.probe_perf()
        if "instructions" in parts and self.args.instr_method != "perf" and \
                (self.args.instr_method == "callgrind" or not self.perf_ok):
            want["valgrind"] = "valgrind"
            want["callgrind_control"] = "valgrind"
        for attempt in (1, 2):
            bindir = self.pg_bindir()
            missing = []
            for tool, pkg in want.items():
                path = self.find_tool(tool, bindir)
                if path:
                    self.tools[tool] = path
                elif pkg not in missing:
                    missing.append(pkg)
            if not missing:
                break
            if attempt == 2:
                raise BenchError(f"still missing after apt-get: {', '.join(missing)}")
            self.apt_install(missing)
        if self.is_root:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise BenchError("running as root needs a 'postgres' OS user for initdb/postgres/pgbouncer "
                                 "(the postgresql package creates it)")
            self.pg_uid, self.pg_gid = pw.pw_uid, pw.pw_gid

    def probe_perf(self) -> None:
        """Can `perf stat -e instructions` count here? (Not in most VMs: no PMU exposed to the guest.)"""
        if self.perf_reason is not None or self.perf_ok:
            return
        perf = shutil.which("perf") or ("/usr/bin/perf" if os.access("/usr/bin/perf", os.X_OK) else None)
        if not perf:
            self.perf_reason = "perf not installed"
            return
        try:   # tracepoints count without CPU counters (a VM), but need tracefs and the rights to use it
            res = subprocess.run([perf, "stat", "-x,", "-e", ",".join(TRACEPOINTS), "--", "true"],
                                 capture_output=True, text=True, timeout=30)
            counted = [l for l in res.stderr.splitlines() if l.split(",", 1)[0].isdigit()]
            if len(counted) == len(TRACEPOINTS):
                self.trace_ok, self.tools["perf"] = True, perf
        except (OSError, subprocess.TimeoutExpired):
            pass
        try:
            res = subprocess.run([perf, "stat", "-x,", "-e", "instructions", "--", "true"], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.perf_reason = f"perf stat failed: {e}"
            return
        line = next((l for l in res.stderr.splitlines() if ",instructions" in l), "")
        value = line.split(",", 1)[0]
        if value.isdigit():
            self.perf_ok, self.tools["perf"] = True, perf
            return
        try:
            paranoid = Path("/proc/sys/kernel/perf_event_paranoid").read_text().strip()
        except OSError:
            paranoid = "?"
        if value == "<not supported>":
            dmesg = ""
            try:
                out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
                dmesg = next((l.split("]", 1)[-1].strip() for l in out.splitlines() if "PMU" in l), "")
            except (OSError, subprocess.TimeoutExpired):
                pass
            self.perf_reason = ("the instructions counter is not supported on this machine"
                                + (f" (kernel: {dmesg})" if dmesg else "") + f"; perf_event_paranoid={paranoid}")
        else:
            self.perf_reason = (f"perf stat -e instructions did not count ({(line or res.stderr.strip())[:120]!r}); "
                                f"perf_event_paranoid={paranoid}")

    def build(self) -> None:
        if self.args.no_build:
            return
        if not shutil.which("cargo"):
            raise BenchError("cargo not found: install Rust or pass --no-build with a built binary")
        log("cargo build --release -p pgtenant")
        res = subprocess.run(["cargo", "build", "--release", "-p", "pgtenant"], cwd=REPO, timeout=3600)
        if res.returncode != 0:
            raise BenchError("cargo build --release -p pgtenant failed")

    def prepare_binary(self) -> None:
        src = Path(self.args.pgtenant) if self.args.pgtenant else REPO / "target" / "release" / "pgtenant"
        if not os.access(src, os.X_OK):
            raise BenchError(f"{src} not found: build it (cargo build --release -p pgtenant) or drop --no-build")
        # A private copy: a rebuild during the run must not change the binary between instances.
        dst = self.tmp / "pgtenant"
        shutil.copy2(src, dst)
        self.pgtenant_bin = dst
        ver = subprocess.run([str(dst), "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
        self.results["meta"]["pgtenant"] = {"binary": str(src), "version": ver,
                                            "mtime": datetime.datetime.fromtimestamp(
                                                src.stat().st_mtime, datetime.timezone.utc).isoformat()}

    def make_tmp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="pgtenant-bench-"))
        if self.is_root:
            os.chmod(self.tmp, 0o755)   # the postgres user must reach its own subdirectories

    def pg_owned_dir(self, name: str) -> Path:
        d = self.tmp / name
        d.mkdir(mode=0o700)
        if self.is_root:
            os.chown(d, self.pg_uid, self.pg_gid)
        return d

    def spawn(self, name: str, cmd: list[str], as_pg: bool = False, env: dict | None = None,
              stop_signal=signal.SIGTERM) -> Proc:
        log_path = self.tmp / f"{name}.log"
        logf = open(log_path, "ab")
        kwargs = {}
        if as_pg and self.is_root:
            kwargs = {"user": self.pg_uid, "group": self.pg_gid, "extra_groups": []}
        try:
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                     env=env if env is not None else clean_env(), cwd=self.tmp,
                                     start_new_session=True, **kwargs)
        finally:
            logf.close()
        proc = Proc(name, popen, log_path, stop_signal)
        self.procs.append(proc)
        return proc

    def run_cmd(self, cmd: list[str], as_pg: bool = False, timeout: float = 600, input: str | None = None,
                env: dict | None = None, what: str | None = None) -> str:
        kwargs = {}
        if as_pg and self.is_root:
            kwargs = {"user": self.pg_uid, "group": self.pg_gid, "extra_groups": []}
        try:
            res = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout,
                                 env=env if env is not None else clean_env(), cwd=self.tmp, **kwargs)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{what or cmd[0]} timed out after {timeout:.0f} s")
        if res.returncode != 0:
            raise BenchError(f"{what or ' '.join(cmd)} failed (exit {res.returncode}):\n"
                             f"{res.stderr.strip()[-3000:] or res.stdout.strip()[-3000:]}")
        return res.stdout

    # ---------------------------------------------------------------- postgres

    def start_postgres(self) -> None:
        data = self.pg_owned_dir("pgdata")
        sock = self.pg_owned_dir("sock")
        self.sockdir = sock
        log("initdb")
        self.run_cmd([self.tools["initdb"], "-D", str(data), "-U", "postgres", "-E", "UTF8", "--locale=C",
                      "--auth-local=trust", "--auth-host=scram-sha-256"], as_pg=True, timeout=300,
                     what="initdb")
        hba = data / "pg_hba.conf"
        hba_text = ("local all all trust\n"
                    "host all all 127.0.0.1/32 scram-sha-256\n")
        hba.write_text(hba_text)
        if self.is_root:
            os.chown(hba, self.pg_uid, self.pg_gid)
        self.pgport = free_port()
        settings = {
            "port": self.pgport, "listen_addresses": "127.0.0.1", "unix_socket_directories": str(sock),
            "max_connections": 200, "shared_buffers": "128MB", "fsync": "off", "synchronous_commit": "off",
            "full_page_writes": "off", "password_encryption": "scram-sha-256", "logging_collector": "off",
            "log_min_messages": "warning", "autovacuum": "off",
        }
        cmd = [self.tools["postgres"], "-D", str(data)]
        for k, v in settings.items():
            cmd += ["-c", f"{k}={v}"]
        log(f"starting postgres on 127.0.0.1:{self.pgport}")
        proc = self.spawn("postgres", cmd, as_pg=True, stop_signal=signal.SIGINT)  # SIGINT: fast shutdown
        deadline = time.monotonic() + 60
        while True:
            if not proc.alive():
                raise BenchError(f"postgres exited at startup:\n{proc.log_tail()}")
            r = subprocess.run([self.tools["pg_isready"], "-q", "-h", str(sock), "-p", str(self.pgport)],
                               timeout=10, env=clean_env())
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"postgres not ready after 60 s:\n{proc.log_tail()}")
            time.sleep(0.2)
        self.postgres = proc
        ver = self.psql("SHOW server_version", db="postgres").strip()
        self.results["meta"]["postgres"] = ver

    def psql(self, sql: str, db: str = "app", timeout: float = 900) -> str:
        """Runs SQL as the superuser over the Unix socket; returns unaligned tuples-only output."""
        return self.run_cmd([self.tools["psql"], "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                             "-h", str(self.sockdir), "-p", str(self.pgport), "-U", "postgres", "-d", db,
                             "-f", "-"], input=sql, timeout=timeout, what=f"psql ({sql.strip()[:60]!r})")

    def psql_tcp(self, port: int, user: str, password: str, sql: str, timeout: float = 60,
                 db: str = "app") -> str:
        """Runs SQL as a client over TCP (to pgtenant, PgBouncer or Postgres). It goes by the name
        of the measured client, pgbench: the checks that run first would otherwise give a pooled
        connection of pgtenant's a name no measured transaction has (it logs in with the name of the
        client it was opened for: docs/protocol.md, "Client parameters"), which one application
        behind pgtenant never does."""
        return self.run_cmd([self.tools["psql"], "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                             "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", db, "-c", sql],
                            timeout=timeout, env=clean_env(PGPASSWORD=password, PGSSLMODE="disable",
                                                           PGCONNECT_TIMEOUT="10", PGAPPNAME="pgbench"),
                            what=f"psql to port {port} as {user} ({sql[:60]!r})")

    def load_data(self) -> None:
        log("loading tests/fixtures/rls.sql into database app")
        self.psql("CREATE DATABASE app", db="postgres")
        self.psql(FIXTURE.read_text())
        n = self.args.rows
        log(f"creating table bench with {n:,} rows ({TENANTS} tenants)")
        self.psql(f"""
            INSERT INTO tenants SELECT g, 'tenant ' || g FROM generate_series(1, {TENANTS}) g
              ON CONFLICT (id) DO NOTHING;
            SET ROLE app_owner;
            CREATE TABLE bench (
              id        integer NOT NULL,
              tenant_id integer NOT NULL,
              val       integer NOT NULL,
              note      text    NOT NULL
            );
            ALTER TABLE bench ENABLE ROW LEVEL SECURITY;
            ALTER TABLE bench FORCE ROW LEVEL SECURITY;
            CREATE POLICY tenant_isolation ON bench
              USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::integer);
            GRANT SELECT ON bench TO app_user;
            RESET ROLE;
            INSERT INTO bench
              SELECT g, 1 + (g - 1) % {TENANTS}, (g::bigint * 7919 % 100000)::integer, md5(g::text)
              FROM generate_series(1, {n}) g;
            ALTER TABLE bench ADD PRIMARY KEY (id);
        """)
        if self.write_rows:
            w = self.write_rows
            log(f"creating table bench_write with {w:,} rows (write mix)")
            # The write mix inserts (id from a nextval default, tenant_id from the context) and updates
            # one of the tenant's preloaded rows; WITH CHECK: only rows of the client's own tenant.
            self.psql(f"""
                SET ROLE app_owner;
                CREATE TABLE bench_write (
                  id        bigserial PRIMARY KEY,
                  tenant_id integer NOT NULL DEFAULT NULLIF(current_setting('app.tenant_id', true), '')::integer,
                  val       integer NOT NULL,
                  note      text    NOT NULL
                );
                ALTER TABLE bench_write ENABLE ROW LEVEL SECURITY;
                ALTER TABLE bench_write FORCE ROW LEVEL SECURITY;
                CREATE POLICY tenant_isolation ON bench_write
                  USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::integer)
                  WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::integer);
                GRANT SELECT, INSERT, UPDATE ON bench_write TO app_user;
                GRANT USAGE ON SEQUENCE bench_write_id_seq TO app_user;
                RESET ROLE;
                INSERT INTO bench_write (id, tenant_id, val, note)
                  SELECT g, 1 + (g - 1) % {TENANTS}, (g::bigint * 7919 % 100000)::integer, md5(g::text)
                  FROM generate_series(1, {w}) g;
                SELECT setval('bench_write_id_seq', {w});
            """)
        self.psql("VACUUM ANALYZE")
        # The lookup must be a primary-key index scan under the policy, as the restricted role.
        probe = self.tenant + 100 * min(1, self.maxk)
        plan = self.psql(f"""
            SET ROLE app_user;
            SELECT set_config('app.tenant_id', '{self.tenant}', false);
            EXPLAIN (COSTS OFF) {LOOKUP_SQL.format(id=probe)};
        """)
        if "Index Scan using bench_pkey" not in plan:
            raise BenchError(f"the lookup is not a primary-key index scan:\n{plan}")
        size = self.psql("SELECT pg_size_pretty(pg_total_relation_size('bench'))").strip()
        self.results["meta"]["table"] = {"name": "bench", "rows": n, "tenants": TENANTS, "size": size,
                                         "plan": " / ".join(l.strip() for l in plan.splitlines()[1:] if l.strip())}

    # ---------------------------------------------------------------- pgtenant

    def write_pgtenant_config(self, name: str, port: int, admin: int, pool: int, jwt: str, server: str = "",
                              threads: int | None = None) -> Path:
        path = self.tmp / f"{name}.toml"
        # 0 is pgtenant's default: left out, so that binaries older than the key run too
        threads = self.args.worker_threads if threads is None else threads
        threads = f"worker_threads = {threads}\n" if threads else ""
        path.write_text(f"""# written by bench/run.py
[server]
listen = "127.0.0.1:{port}"
max_clients = 20000
shutdown_timeout_s = 2
{threads}{server}
[backend]
url = "postgres://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{self.pgport}/app"
pool_size = {pool}

[jwt]
{jwt}

[tenant]
# the same two settings the set_config script makes; the claims-object setting is off
settings = {{ "app.tenant_id" = "tenant_id", "app.user_id" = "sub" }}
claims_setting = ""

[admin]
listen = "127.0.0.1:{admin}"

[log]
level = "warn"
""")
        return path

    def start_pgtenant(self, name: str, pool: int, jwt: str | None = None, wrap: list[str] | None = None,
                       ready_s: float = 30, port: int | None = None, server: str = "",
                       threads: int | None = None) -> tuple[Proc, int, int]:
        port, admin = port or free_port(), free_port()
        cfg = self.write_pgtenant_config(name, port, admin, pool, jwt or f'secret = "{self.secret}"', server, threads)
        proc = self.spawn(name, (wrap or []) + [str(self.pgtenant_bin), "run", "--config", str(cfg)])
        deadline = time.monotonic() + ready_s
        while True:
            if not proc.alive():
                raise BenchError(f"{name} exited at startup:\n{proc.log_tail()}")
            try:
                status, body = http_get(f"http://127.0.0.1:{admin}/readyz", timeout=2)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"{name} not ready after {ready_s:.0f} s (/readyz):\n{proc.log_tail()}")
            time.sleep(0.1)
        log(f"{name} (pid {proc.pid}) on 127.0.0.1:{port}, pool {pool}")
        return proc, port, admin

    def stop_proc(self, proc: Proc | None) -> None:
        if proc is not None:
            proc.stop()
            if proc in self.procs:
                self.procs.remove(proc)

    def ensure_fleet(self) -> None:
        """--reuseport-processes N: N single-threaded pgtenant processes sharing one port
        (server.so_reuseport), each with pool / N connections and its own address for cancels."""
        n = self.args.reuseport_processes
        if not n or self.fleet:
            return
        self.fleet_port = free_port()
        own = [free_port() for _ in range(n)]
        peers = "".join(f'{i + 1} = "127.0.0.1:{p}"\n' for i, p in enumerate(own))
        for i in range(n):
            server = (f'so_reuseport = true\npeer_id = {i + 1}\npeer_listen = "127.0.0.1:{own[i]}"\n'
                      f"[peers]\n{peers}")
            proc, _, _ = self.start_pgtenant(f"pgtenant-fleet-{i + 1}", max(self.args.pool // n, 1),
                                             port=self.fleet_port, server=server, threads=1)
            self.fleet.append(proc)
        self.bouncer_fleet_port = free_port()
        for i in range(n):
            proc, _ = self.start_bouncer(f"pgbouncer-fleet-{i + 1}", port=self.bouncer_fleet_port,
                                         pool=max(self.args.pool // n, 1))
            self.bouncer_fleet.append(proc)

    def ensure_main_pgtenant(self) -> None:
        self.ensure_fleet()
        if self.pgtenant_main is not None:
            return
        self.pgtenant_main, self.pgtenant_main_port, self.pgtenant_main_admin = \
            self.start_pgtenant("pgtenant", self.args.pool)
        self.token = self.run_cmd([str(self.pgtenant_bin), "token", "--secret", self.secret,
                                   "--claim", f"tenant_id={self.tenant}", "--sub", "bench", "--ttl", "3h"],
                                  what="pgtenant token").strip()
        # Sanity: through pgtenant the client sees exactly its own tenant's rows.
        out = self.psql_tcp(self.pgtenant_main_port, CLIENT_USER, self.token,
                            f"SELECT current_setting('app.tenant_id'), (SELECT count(*) FROM bench), "
                            f"(SELECT tenant_id FROM bench WHERE id = {self.tenant}), "
                            f"(SELECT count(*) FROM bench WHERE id = {self.tenant % TENANTS + 1})").strip()
        expect = f"{self.tenant}|{self.args.rows // TENANTS}|{self.tenant}|0"
        if out != expect:
            raise BenchError(f"pgtenant sanity check: expected {expect!r}, got {out!r}")
        if self.write_rows:
            # The write transaction (one Query, as the simple-mode script sends it) through pgtenant: the
            # new row belongs to the client's tenant, the updated row too.
            out = self.psql_tcp(self.pgtenant_main_port, CLIENT_USER, self.token,
                                f"BEGIN; INSERT INTO bench_write (val, note) VALUES (1, 'sanity') RETURNING tenant_id; "
                                f"UPDATE bench_write SET val = val + 1 WHERE id = {self.tenant} RETURNING tenant_id; "
                                f"COMMIT").split()
            if out != [str(self.tenant), str(self.tenant)]:
                raise BenchError(f"pgtenant write sanity check: expected tenant {self.tenant} twice, got {out!r}")

    # ---------------------------------------------------------------- pgbouncer

    @property
    def tenant_db(self) -> str:
        """PgBouncer database whose server connections carry tenant self.tenant's context."""
        return f"app_t{self.tenant}"

    def connect_query(self) -> str:
        """Session-level context of the per-tenant PgBouncer database (pgbouncer.ini quoting: '' is ')."""
        return (f"SELECT set_config(''app.tenant_id'', ''{self.tenant}'', false), "
                f"set_config(''app.user_id'', ''bench'', false)")

    def start_bouncer(self, name: str, wrap: list[str] | None = None, ready_s: float = 30, port: int | None = None,
                      pool: int | None = None) -> tuple[Proc, int]:
        """A PgBouncer in transaction pooling with two databases: `app` (no context) and the per-tenant
        database (connect_query sets tenant self.tenant's context on each server connection). With
        `port` given, it shares that port with other PgBouncers (so_reuseport)."""
        d = self.pg_owned_dir(name)
        shared = port is not None
        port = port or free_port()
        pool = pool or self.args.pool
        userlist = d / "userlist.txt"
        userlist.write_text(f'"{BOUNCER_USER}" "{BOUNCER_PASSWORD}"\n')
        extra = ""
        if self.bouncer_version() >= (1, 21):
            extra = "max_prepared_statements = 200\n"
        server = f"host=127.0.0.1 port={self.pgport} dbname=app user={APP_USER} password={APP_PASSWORD}"
        ini = d / "pgbouncer.ini"
        ini.write_text(f"""; written by bench/run.py
[databases]
app = {server}
{self.tenant_db} = {server} connect_query='{self.connect_query()}'

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = plain
auth_file = {userlist}
pool_mode = transaction
default_pool_size = {pool}
min_pool_size = 0
reserve_pool_size = 0
max_db_connections = {pool}
so_reuseport = {1 if shared else 0}
max_client_conn = 15000
log_connections = 0
log_disconnections = 0
stats_period = 60
ignore_startup_parameters = extra_float_digits
{extra}""")
        if self.is_root:
            for p in (userlist, ini):
                os.chown(p, self.pg_uid, self.pg_gid)
                os.chmod(p, 0o600)
        proc = self.spawn(name, (wrap or []) + [self.tools["pgbouncer"], str(ini)], as_pg=True)
        deadline = time.monotonic() + ready_s
        while True:
            if not proc.alive():
                raise BenchError(f"{name} exited at startup:\n{proc.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"{name} not listening after {ready_s:.0f} s:\n{proc.log_tail()}")
            time.sleep(0.1)
        log(f"{name} (pid {proc.pid}) on 127.0.0.1:{port}, pool {pool}")
        return proc, port

    def bouncer_sanity(self, port: int) -> None:
        out = self.psql_tcp(port, BOUNCER_USER, BOUNCER_PASSWORD,
                            f"BEGIN; SELECT set_config('app.tenant_id', '{self.tenant}', true); "
                            f"SELECT count(*) FROM bench WHERE id = {self.tenant}; COMMIT;").split()
        if out[-1] != "1":
            raise BenchError(f"pgbouncer sanity check: expected 1 row for tenant {self.tenant}, got {out}")
        out = self.psql_tcp(port, BOUNCER_USER, BOUNCER_PASSWORD,
                            f"SELECT current_setting('app.tenant_id'), current_setting('app.user_id'), "
                            f"(SELECT count(*) FROM bench), (SELECT tenant_id FROM bench WHERE id = {self.tenant})",
                            db=self.tenant_db).strip()
        expect = f"{self.tenant}|bench|{self.args.rows // TENANTS}|{self.tenant}"
        if out != expect:
            raise BenchError(f"pgbouncer {self.tenant_db} (connect_query) sanity check: expected {expect!r}, "
                             f"got {out!r}")
        if self.write_rows:
            for db, ctx in (("app", f"SELECT set_config('app.tenant_id', '{self.tenant}', true); "),
                            (self.tenant_db, "")):
                out = self.psql_tcp(port, BOUNCER_USER, BOUNCER_PASSWORD,
                                    f"BEGIN; {ctx}INSERT INTO bench_write (val, note) VALUES (1, 'sanity') "
                                    f"RETURNING tenant_id; UPDATE bench_write SET val = val + 1 WHERE id = "
                                    f"{self.tenant} RETURNING tenant_id; COMMIT", db=db).split()
                if out[-2:] != [str(self.tenant), str(self.tenant)]:
                    raise BenchError(f"pgbouncer write sanity check ({db}): expected tenant {self.tenant} twice, "
                                     f"got {out!r}")

    def ensure_bouncer(self) -> None:
        if self.bouncer is not None:
            return
        self.bouncer, self.bouncer_port = self.start_bouncer("pgbouncer")
        self.bouncer_sanity(self.bouncer_port)

    def bouncer_version(self) -> tuple[int, int]:
        if getattr(self, "_bouncer_version", None):
            return self._bouncer_version
        out = subprocess.run([self.tools["pgbouncer"], "--version"], capture_output=True, text=True,
                             timeout=10).stdout
        m = re.search(r"PgBouncer (\d+)\.(\d+)", out)
        ver = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        self.results["meta"]["pgbouncer"] = f"{ver[0]}.{ver[1]}" if m else "unknown"
        self._bouncer_version = ver
        return ver

    def bouncer_supports_prepared(self) -> bool:
        return self.bouncer_version() >= (1, 21)

    # ---------------------------------------------------------------- pgbench rows

    def rows_for(self, mix: str, mode: str) -> list[str]:
        """The rows of a mix in a pgbench mode, in the order they run within a round."""
        extra = self.args.extra_rows
        bouncer_prep = self.bouncer_supports_prepared()
        if mix == "read":
            if mode == "simple":
                rows = [ROW_DIRECT8, ROW_BOUNCER_SAME, ROW_PGTENANT, ROW_BOUNCER_CTX, ROW_DIRECT]
                rows += [ROW_BOUNCER_CQ, ROW_BOUNCER_PLAIN] if extra else []
            elif mode == "extended":
                rows = [ROW_DIRECT8, ROW_BOUNCER_CQ, ROW_PGTENANT, ROW_BOUNCER_CTX, ROW_DIRECT]
                rows += [ROW_BOUNCER_PLAIN] if extra else []
            else:
                rows = [ROW_DIRECT8] + ([ROW_BOUNCER_CQ] if bouncer_prep else []) + [ROW_PGTENANT] + \
                       ([ROW_BOUNCER_CTX] if bouncer_prep else []) + [ROW_DIRECT]
                rows += [ROW_BOUNCER_PLAIN] if extra and bouncer_prep else []
        else:
            if mode == "simple":
                rows = [ROW_DIRECT8, ROW_BOUNCER_SAME, ROW_PGTENANT] + ([ROW_BOUNCER_CQ] if extra else [])
            elif mode == "extended":
                rows = [ROW_DIRECT8, ROW_BOUNCER_CQ, ROW_PGTENANT]
            else:
                rows = [ROW_DIRECT8] + ([ROW_BOUNCER_CQ] if bouncer_prep else []) + [ROW_PGTENANT]
        if self.args.reuseport_processes and mix == "read":
            n = self.args.reuseport_processes
            bmode, brow = self.baseline(mode)
            rows += [ROW_FLEET.format(n=n)] + ([ROW_BOUNCER_FLEET.format(row=brow, n=n)] if bmode == mode else [])
        if self.args.sched_batch:
            bmode, brow = self.baseline(mode)
            rows += [ROW_PGTENANT + BATCH] + ([brow + BATCH] if bmode == mode else [])
        return rows

    def baseline(self, mode: str) -> tuple[str, str]:
        """(mode, row) of PgBouncer's best same-work configuration that pgtenant in `mode` is compared with."""
        if mode == "simple":
            return "simple", ROW_BOUNCER_SAME
        if mode == "extended" or self.bouncer_supports_prepared():
            return mode, ROW_BOUNCER_CQ
        return "simple", ROW_BOUNCER_SAME   # PgBouncer < 1.21: no prepared statements in transaction pooling

    def row_spec(self, mix: str, mode: str, row: str) -> dict:
        """Where a row's pgbench connects, as whom, with which script and how many clients."""
        if row.endswith(BATCH):
            return self.row_spec(mix, mode, row[:-len(BATCH)])
        a = self.args
        simple = mode == "simple"
        ctx_options = f"-c app.tenant_id={self.tenant} -c app.user_id=bench"
        direct = {"port": self.pgport, "user": APP_USER, "password": APP_PASSWORD, "pid": None, "db": "app"}
        bouncer = {"port": self.bouncer_port, "user": BOUNCER_USER, "password": BOUNCER_PASSWORD,
                   "pid": self.bouncer.pid if self.bouncer else None, "db": "app"}
        pgt = {"port": self.pgtenant_main_port, "user": CLIENT_USER, "password": self.token,
               "pid": self.pgtenant_main.pid if self.pgtenant_main else None, "db": "app"}
        read = mix == "read"
        # write mix: one Query in simple mode, four messages with a Sync each in extended mode, one pipeline
        # (one Sync) in prepared mode
        w_script = {"simple": SCRIPT_W_1Q, "extended": SCRIPT_W_TX, "prepared": SCRIPT_W_PIPE}[mode]
        if row == ROW_DIRECT8:
            # the same work as PgBouncer's best row of the mode, straight to Postgres on `pool` connections
            return dict(direct, clients=a.pool, script=(SCRIPT_SAME if read else SCRIPT_W_SAME) if simple
                        else (SCRIPT_SELECT if read else w_script), options=None if simple else ctx_options)
        if row == ROW_BOUNCER_SAME:
            return dict(bouncer, clients=a.clients, script=SCRIPT_SAME if read else SCRIPT_W_SAME, options=None)
        if row == ROW_BOUNCER_CQ:
            return dict(bouncer, db=self.tenant_db, clients=a.clients, options=None,
                        script=SCRIPT_SELECT if read else w_script)
        if row == ROW_PGTENANT:
            return dict(pgt, clients=a.clients, options=None, script=SCRIPT_SELECT if read else w_script)
        if row == ROW_FLEET.format(n=a.reuseport_processes):
            return dict(pgt, port=self.fleet_port, pid=[p.pid for p in self.fleet], clients=a.clients, options=None,
                        script=SCRIPT_SELECT)
        for base in (ROW_BOUNCER_SAME, ROW_BOUNCER_CQ):
            if row == ROW_BOUNCER_FLEET.format(row=base, n=a.reuseport_processes):
                return dict(self.row_spec(mix, mode, base), port=self.bouncer_fleet_port,
                            pid=[p.pid for p in self.bouncer_fleet])
        if row == ROW_BOUNCER_CTX:
            return dict(bouncer, clients=a.clients, script=SCRIPT_CTX, options=None)
        if row == ROW_DIRECT:
            return dict(direct, clients=a.clients, script=SCRIPT_CTX, options=None)
        if row == ROW_BOUNCER_PLAIN:
            return dict(bouncer, clients=a.clients, script=SCRIPT_SELECT, options=None)
        raise ValueError(row)

    def pgbench(self, port: int, user: str, password: str, script: Path, mode: str, clients: int,
                threads: int, duration: float | None = None, transactions: int | None = None,
                connect_each: bool = False, log_prefix: Path | None = None, cpu_pid: int | None = None,
                db: str = "app", options: str | None = None, rate: int | None = None,
                perf: bool = False) -> dict:
        cmd = [self.tools["pgbench"], "-n", "-h", "127.0.0.1", "-p", str(port), "-U", user,
               "-c", str(clients), "-j", str(min(threads, clients)), "-M", mode, "-f", str(script),
               "-D", f"tenant={self.tenant}", "-D", f"maxk={self.maxk}", "-D", f"wmaxk={self.wmaxk}"]
        cmd += ["-T", str(int(duration))] if duration else ["-t", str(transactions)]
        if rate:
            cmd += ["-R", str(rate)]
        if connect_each:
            cmd.append("-C")
        if log_prefix:
            cmd += ["-l", "--log-prefix", str(log_prefix)]
        cmd.append(db)
        env = clean_env(PGPASSWORD=password, PGSSLMODE="disable", PGCONNECT_TIMEOUT="10")
        if options:
            env["PGOPTIONS"] = options
        timeout = (duration or 0) + 180 + (transactions or 0) * clients / max(rate or 1000, 1)
        perf_proc = perf_out = None
        events = (["instructions"] if self.perf_ok else []) + (list(TRACEPOINTS) if self.trace_ok else [])
        if perf and cpu_pid and events:
            pids = ",".join(map(str, cpu_pid)) if isinstance(cpu_pid, list) else str(cpu_pid)
            perf_out = self.tmp / f"perf-stat-{pids.replace(',', '-')}-{time.monotonic_ns()}.csv"
            perf_proc = subprocess.Popen([self.tools["perf"], "stat", "-x,", "-e", ",".join(events), "-p", pids,
                                          "-o", str(perf_out)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
            time.sleep(0.3)   # let perf attach to every thread
        cpu0 = proc_cpu_split(cpu_pid) if cpu_pid else None
        cs0 = proc_ctx_switches(cpu_pid) if cpu_pid else None
        snap0 = cpu_snapshot()
        t0 = time.monotonic()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=self.tmp)
        except subprocess.TimeoutExpired:
            return {"error": f"pgbench timed out after {timeout:.0f} s"}
        finally:
            if perf_proc is not None:
                perf_proc.send_signal(signal.SIGINT)
                try:
                    perf_proc.wait(20)
                except subprocess.TimeoutExpired:
                    perf_proc.kill()
                    perf_proc.wait(5)
        wall = time.monotonic() - t0
        snap1 = cpu_snapshot()
        cpu1 = proc_cpu_split(cpu_pid) if cpu_pid else None
        cs1 = proc_ctx_switches(cpu_pid) if cpu_pid else None
        out = res.stdout
        r: dict = {"wall_s": round(wall, 2), "other_cpu_pct": other_cpu_pct(snap0, snap1)}

        def grab(pattern, conv=float):
            m = re.search(pattern, out)
            return conv(m.group(1)) if m else None
        r["txns"] = grab(r"number of transactions actually processed: (\d+)", int)
        r["failed"] = grab(r"number of failed transactions: (\d+)", int) or 0
        r["tps"] = grab(r"tps = ([\d.]+)")
        r["lat_avg_ms"] = grab(r"latency average = ([\d.]+) ms")
        n = r["txns"]
        if cpu_pid is not None:
            user_s, sys_s = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
            r["proxy_cpu_s"] = round(user_s + sys_s, 3)
            r["proxy_cpu_s_per_1k"] = round((user_s + sys_s) / n * 1000, 4) if n else None
            r["cpu_us_per_tx"] = round((user_s + sys_s) / n * 1e6, 2) if n else None
            r["user_us_per_tx"] = round(user_s / n * 1e6, 2) if n else None
            r["sys_us_per_tx"] = round(sys_s / n * 1e6, 2) if n else None
            r["ctx_switches_per_tx"] = round((cs1 - cs0) / n, 3) if n else None
        if perf_out is not None:
            try:
                for line in perf_out.read_text().splitlines():
                    fields = line.split(",")
                    if len(fields) > 2 and fields[2].startswith("instructions") and fields[0].isdigit():
                        r["instructions"] = int(fields[0])
                        r["instructions_per_tx"] = round(int(fields[0]) / n) if n else None
                    elif len(fields) > 2 and fields[2] in TRACEPOINTS and fields[0].isdigit() and n:
                        r[TRACEPOINTS[fields[2]]] = round(int(fields[0]) / n, 3)
            except OSError:
                pass
        errs = [l for l in res.stderr.splitlines() if "error" in l.lower() or "abort" in l.lower()
                or "fatal" in l.lower()]
        if res.returncode != 0 or r["tps"] is None or r["failed"]:
            r["error"] = (f"pgbench exit {res.returncode}: " + " | ".join(errs[:3] or
                          res.stderr.strip().splitlines()[-3:] or ["no output"]))[:500]
        if log_prefix:
            lats = []
            for f in glob.glob(f"{log_prefix}.*"):
                with open(f) as fh:
                    for line in fh:
                        parts = line.split(None, 3)
                        if len(parts) >= 3 and parts[2].isdigit():
                            lats.append(int(parts[2]))
                os.unlink(f)
            lats.sort()
            p99 = percentile(lats, 99)
            r["p99_ms"] = round(p99 / 1000.0, 3) if p99 is not None else None
            r["p50_ms"] = round(percentile(lats, 50) / 1000.0, 3) if lats else None
            r["logged_txns"] = len(lats)
        return r

    def run_row(self, mix: str, mode: str, row: str, **kw) -> dict:
        t = self.row_spec(mix, mode, row)
        batch = row.endswith(BATCH)
        if batch:
            self.set_sched(t["pid"], "--batch")
        try:
            return self.pgbench(t["port"], t["user"], t["password"], t["script"], mode, t["clients"], self.args.threads,
                                cpu_pid=t["pid"], db=t["db"], options=t["options"], **kw)
        finally:
            if batch:
                self.set_sched(t["pid"], "--other")

    def set_sched(self, pid: int, policy: str) -> None:
        """Switch every thread of a running proxy to a scheduling policy (chrt --batch / --other, priority 0):
        the SCHED_BATCH rows run the very process of the row they are compared with."""
        self.run_cmd([self.tools["chrt"], "-a", policy, "-p", "0", str(pid)], timeout=30,
                     what=f"chrt {policy} {pid}")

    def part_pgbench(self) -> None:
        self.run_mix("read", "pgbench")

    def part_writes(self) -> None:
        self.run_mix("write", "writes")

    def run_mix(self, mix: str, key: str) -> None:
        a = self.args
        self.ensure_main_pgtenant()
        self.ensure_bouncer()
        logs = self.tmp / "pgbench-logs"
        logs.mkdir(exist_ok=True)
        modes = [m for m in MODES if m in a.modes]
        plan = [(mode, row) for mode in modes for row in self.rows_for(mix, mode)]
        for mode in modes:   # the baseline of -M prepared may be a simple-mode row
            if self.baseline(mode) not in plan:
                plan.append(self.baseline(mode))
        skipped = {}
        if "prepared" in modes and not self.bouncer_supports_prepared():
            skipped["prepared"] = (f"PgBouncer {self.results['meta']['pgbouncer']} has no protocol-level prepared "
                                   "statements in transaction pooling (added in 1.21): pgbench -M prepared cannot run "
                                   "through it; pgtenant -M prepared is compared with PgBouncer's simple-protocol "
                                   "same-query row")
        what = "read mix (primary-key lookup)" if mix == "read" else \
            "write mix (INSERT ... RETURNING + UPDATE ... RETURNING in one transaction)"
        log(f"{key}: {what}, {a.clients} clients (-j {a.threads}; direct (8 connections): {a.pool}), pool {a.pool}, "
            f"{len(plan)} rows x {a.rounds} rounds x {a.duration} s, interleaved")
        # Warm-up: fills the pools, the buffer cache and pgtenant's statement caches.
        for mode, row in plan:
            w = self.run_row(mix, mode, row, transactions=20)
            if w.get("error"):
                raise BenchError(f"warm-up of {mix} row {row!r} ({mode}) failed: {w['error']}")
        runs = []
        for rnd in range(1, a.rounds + 1):
            k = (rnd - 1) * len(plan) // a.rounds      # rotate the order from round to round
            for mode, row in plan[k:] + plan[:k]:
                slug = re.sub(r"[^a-z0-9]+", "_", row.lower()).strip("_")
                r = self.run_row(mix, mode, row, duration=a.duration, log_prefix=logs / f"{mix}-{slug}-{mode}-{rnd}",
                                 perf=True)
                r.update(row=row, mode=mode, round=rnd)
                runs.append(r)
                if r.get("error"):
                    log(f"  {mode:8} round {rnd} {row:24} ERROR {r['error']}")
                else:
                    log(f"  {mode:8} round {rnd} {row:24} {r['tps']:9.1f} tps  avg {r['lat_avg_ms']:.3f} ms"
                        f"  p99 {fmt(r.get('p99_ms'), '.3f')} ms  proxy CPU {fmt(r.get('cpu_us_per_tx'), '.1f')} us/tx"
                        + (f"  {r['instructions_per_tx']} instr/tx" if r.get("instructions_per_tx") else "")
                        + f"  (other load {fmt(r.get('other_cpu_pct'), '.0f')} %)")
        summary: dict = {}
        for mode, row in plan:
            ok = [r for r in runs if r["mode"] == mode and r["row"] == row and not r.get("error")]
            bad = [r for r in runs if r["mode"] == mode and r["row"] == row and r.get("error")]
            spec = self.row_spec(mix, mode, row)
            summary.setdefault(mode, {})[row] = {
                "runs_ok": len(ok), "runs_failed": len(bad), "clients": spec["clients"],
                "script": spec["script"].name, "db": spec["db"], "options": spec["options"],
                "errors": [r["error"] for r in bad][:3],
                **{f: median_or_none([r.get(f) for r in ok])
                   for f in ("tps", "lat_avg_ms", "p99_ms", "cpu_us_per_tx", "user_us_per_tx", "sys_us_per_tx",
                             "ctx_switches_per_tx", "instructions_per_tx", "other_cpu_pct",
                             *TRACEPOINTS.values())},
            }
        ratios = []

        def fig(mode, row, field):
            return (summary.get(mode, {}).get(row) or {}).get(field)

        def ratio(num, den):
            return num / den if (num and den) else None
        for mode in modes:
            pt_tps, pt_cpu = fig(mode, ROW_PGTENANT, "tps"), fig(mode, ROW_PGTENANT, "cpu_us_per_tx")
            bmode, brow = self.baseline(mode)
            entry = {"mode": mode, "baseline": f"{brow}" + (f" (-M {bmode})" if bmode != mode else ""),
                     "tps_ratio": ratio(pt_tps, fig(bmode, brow, "tps")),
                     "cpu_ratio": ratio(pt_cpu, fig(bmode, brow, "cpu_us_per_tx")),
                     "instructions_ratio": ratio(fig(mode, ROW_PGTENANT, "instructions_per_tx"),
                                                 fig(bmode, brow, "instructions_per_tx")),
                     "pgtenant_vs_direct8": ratio(pt_tps, fig(mode, ROW_DIRECT8, "tps")),
                     "baseline_vs_direct8": ratio(fig(bmode, brow, "tps"), fig(bmode, ROW_DIRECT8, "tps"))}
            if a.sched_batch:
                entry["batch"] = {
                    "pgtenant_tps_gain": ratio(fig(mode, ROW_PGTENANT + BATCH, "tps"), pt_tps),
                    "baseline_tps_gain": ratio(fig(bmode, brow + BATCH, "tps"), fig(bmode, brow, "tps")),
                    "tps_ratio": ratio(fig(mode, ROW_PGTENANT + BATCH, "tps"), fig(bmode, brow + BATCH, "tps")),
                    "cpu_ratio": ratio(fig(mode, ROW_PGTENANT + BATCH, "cpu_us_per_tx"),
                                       fig(bmode, brow + BATCH, "cpu_us_per_tx"))}
            if mix == "read":
                entry["vs_bouncer_ctx"] = ratio(pt_tps, fig(mode, ROW_BOUNCER_CTX, "tps"))
                entry["vs_direct64"] = ratio(pt_tps, fig(mode, ROW_DIRECT, "tps"))
            ratios.append(entry)
        metrics = {}
        try:
            _, text = http_get(f"http://127.0.0.1:{self.pgtenant_main_admin}/metrics")
            metrics = {"transactions_total": metric_sum(text, "pgtenant_transactions_total"),
                       "context_injections_total": metric_sum(text, "pgtenant_context_injections_total")}
        except OSError:
            pass
        self.results[key] = {
            "mix": mix,
            "config": {"clients": a.clients, "threads": a.threads, "pool": a.pool, "rounds": a.rounds,
                       "duration_s": a.duration, "rows": a.rows, "write_rows": self.write_rows, "tenant": self.tenant,
                       "instructions": "perf stat -e instructions" if self.perf_ok else f"n/a: {self.perf_reason}",
                       "tracepoints": list(TRACEPOINTS) if self.trace_ok else "n/a: perf cannot count them here"},
            "runs": runs, "summary": summary, "ratios": ratios, "skipped": skipped, "pgtenant_metrics": metrics,
        }

    # ---------------------------------------------------------------- round trips (strace)

    def backend_pids(self, proxy_pid: int) -> list[int]:
        """Postgres backend pids serving the proxy's pooled connections (matched by TCP port)."""
        inodes = set()
        for fd in os.listdir(f"/proc/{proxy_pid}/fd"):
            try:
                link = os.readlink(f"/proc/{proxy_pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
        ports = []
        for table_file in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = Path(table_file).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                parts = line.split()
                if len(parts) > 9 and int(parts[9]) in inodes and int(parts[2].rsplit(":", 1)[1], 16) == self.pgport:
                    ports.append(int(parts[1].rsplit(":", 1)[1], 16))
        if not ports:
            return []
        out = self.psql(f"SELECT pid FROM pg_stat_activity WHERE client_port IN ({','.join(map(str, ports))})")
        return [int(x) for x in out.split()]

    @staticmethod
    def parse_strace(path: Path) -> dict[str, dict[str, int]]:
        counts = {}
        try:
            text = path.read_text()
        except OSError:
            return counts
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 5 and re.fullmatch(r"[\d.]+", parts[0]) and parts[-1] != "total":
                calls = int(parts[3])
                errors = int(parts[4]) if len(parts) == 6 else 0
                counts[parts[-1]] = {"calls": calls, "errors": errors}
        return counts

    def strace_run(self, mix: str, row: str, mode: str) -> dict:
        t = self.row_spec(mix, mode, row)
        txns_per_client, clients = self.args.rt_transactions, 8
        # warm-up so every pooled backend connection exists before the pids are taken
        self.pgbench(t["port"], t["user"], t["password"], t["script"], mode, self.args.clients, 2, duration=1,
                     db=t["db"])
        pids = self.backend_pids(t["pid"])
        if not pids:
            return {"error": "no pooled backend connections found"}
        io = "trace=read,write,readv,writev,recvfrom,sendto,recvmsg,sendmsg"
        tag = f"{mix}-{mode}-{re.sub(r'[^a-z0-9]+', '_', row.lower())}"
        be_out, px_out = self.tmp / f"strace-be-{tag}.txt", self.tmp / f"strace-px-{tag}.txt"
        be_cmd = [self.tools["strace"], "-c", "-o", str(be_out), "-e", io]
        for p in pids:
            be_cmd += ["-p", str(p)]
        px_cmd = [self.tools["strace"], "-f", "-c", "-o", str(px_out), "-e", io, "-p", str(t["pid"])]
        tracers = [subprocess.Popen(c, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True) for c in (be_cmd, px_cmd)]
        try:
            time.sleep(1.5)   # let strace attach to every process and thread
            for tr in tracers:
                if tr.poll() is not None:
                    return {"error": "strace exited early (ptrace not permitted?)"}
            r = self.pgbench(t["port"], t["user"], t["password"], t["script"], mode, clients, 2,
                             transactions=txns_per_client, db=t["db"])
        finally:
            for tr in tracers:
                if tr.poll() is None:
                    tr.send_signal(signal.SIGINT)
            for tr in tracers:
                try:
                    tr.wait(20)
                except subprocess.TimeoutExpired:
                    tr.kill()
                    tr.wait(5)
        if r.get("error"):
            return {"error": r["error"]}
        n = r["txns"] or 1
        be, px = self.parse_strace(be_out), self.parse_strace(px_out)
        ok = lambda d, k: d.get(k, {}).get("calls", 0) - d.get(k, {}).get("errors", 0)
        return {
            "txns": n, "backend_pids": len(pids), "script": t["script"].name, "db": t["db"],
            "backend_sends_per_txn": round(ok(be, "sendto") / n, 2),
            "backend_recvs_per_txn": round(ok(be, "recvfrom") / n, 2),
            "proxy_io_syscalls_per_txn": round(sum(ok(px, k) for k in px) / n, 2),
            "proxy_syscalls": {k: v["calls"] for k, v in px.items()},
        }

    def part_roundtrips(self) -> None:
        self.ensure_main_pgtenant()
        self.ensure_bouncer()
        log(f"round trips: strace around pgbench -t {self.args.rt_transactions} -c 8")
        plan = [("read", "simple", [ROW_BOUNCER_SAME, ROW_BOUNCER_CTX, ROW_PGTENANT]),
                ("read", "extended", [ROW_BOUNCER_CQ, ROW_BOUNCER_CTX, ROW_PGTENANT])]
        if self.args.extra_rows:
            plan[0][2].append(ROW_BOUNCER_PLAIN)
            plan[1][2].append(ROW_BOUNCER_PLAIN)
        if self.write_rows:
            plan += [("write", "simple", [ROW_BOUNCER_SAME, ROW_PGTENANT]),
                     ("write", "extended", [ROW_BOUNCER_CQ, ROW_PGTENANT])]
        out = {}
        for mix, mode, rows in plan:
            for row in rows:
                r = self.strace_run(mix, row, mode)
                out.setdefault(mix, {}).setdefault(mode, {})[row] = r
                if r.get("error"):
                    log(f"  {mix:5} {mode:8} {row:24} ERROR {r['error']}")
                else:
                    log(f"  {mix:5} {mode:8} {row:24} backend sends/txn {r['backend_sends_per_txn']}  "
                        f"proxy I/O syscalls/txn {r['proxy_io_syscalls_per_txn']}")
        self.results["roundtrips"] = out

    # ---------------------------------------------------------------- instructions per transaction

    def part_instructions(self) -> None:
        """Proxy instructions per transaction on a fixed number of rate-limited transactions: repeatable on
        a noisy machine (it does not depend on how much CPU the other processes leave). With perf (a CPU
        that exposes its counters) on the main instances; else under callgrind (user-space instructions
        only, on instances of their own)."""
        a = self.args
        method = a.instr_method
        if method == "auto":
            method = "perf" if self.perf_ok else "callgrind"
        if method == "perf" and not self.perf_ok:
            self.results["instructions"] = {"error": f"perf cannot count instructions: {self.perf_reason}"}
            log(f"instructions: skipped, perf cannot count instructions: {self.perf_reason}")
            return
        self.ensure_main_pgtenant()     # the token, and the sanity checks
        self.ensure_bouncer()
        n_tx, clients, rate = a.instr_transactions, a.instr_clients, a.instr_rate
        per_client = max(1, n_tx // clients)
        mixes = ["read"] + (["write"] if self.write_rows else [])
        modes = [m for m in MODES if m in a.modes]
        procs = []
        if method == "callgrind":
            cgdir = self.pg_owned_dir("callgrind")       # PgBouncer runs as postgres and writes here too
            vg = lambda name: [self.tools["valgrind"], "--tool=callgrind", "--dump-instr=no", "--dump-line=no",
                               f"--callgrind-out-file={cgdir}/{name}.%p"]
            pt_proc, pt_port, _ = self.start_pgtenant("pgtenant-callgrind", a.pool, wrap=vg("pgtenant"), ready_s=180)
            procs.append(pt_proc)
            pb_proc, pb_port = self.start_bouncer("pgbouncer-callgrind", wrap=vg("pgbouncer"), ready_s=120)
            procs.append(pb_proc)
            targets = {"pgtenant": (pt_proc, pt_port), "pgbouncer": (pb_proc, pb_port)}
        else:
            targets = {"pgtenant": (self.pgtenant_main, self.pgtenant_main_port),
                       "pgbouncer": (self.bouncer, self.bouncer_port)}

        def callgrind(pid: int, cmd: str, as_pg: bool) -> None:
            # as the user the process runs as (PgBouncer: postgres): vgdb finds its pipes by user name
            self.run_cmd([self.tools["callgrind_control"], cmd, str(pid)], timeout=120, as_pg=as_pg,
                         what=f"callgrind_control {cmd} {pid}")

        def callgrind_total(pid: int, since: float) -> int | None:
            files = [f for f in glob.glob(f"{cgdir}/*.{pid}*") if os.path.getmtime(f) >= since]
            for f in sorted(files, key=os.path.getmtime, reverse=True):
                with open(f, errors="replace") as fh:
                    for line in fh:
                        if line.startswith(("summary:", "totals:")):
                            return int(line.split()[1])
            return None

        log(f"instructions ({method}): {clients} clients, {per_client * clients:,} transactions per measurement "
            f"at -R {rate} tx/s, {', '.join(mixes)} mix, modes {', '.join(modes)}")
        out = {"method": method, "clients": clients, "transactions": per_client * clients, "rate": rate,
               "perf_reason": None if self.perf_ok else self.perf_reason, "runs": [], "idle_per_s": {}}
        try:
            if method == "callgrind":
                # what each process executes with no traffic at all (timers, metrics upkeep), per second
                for proxy, (proc, _) in targets.items():
                    since = time.time() - 1
                    callgrind(proc.pid, "-z", proxy == "pgbouncer")
                    time.sleep(a.instr_idle_s)
                    callgrind(proc.pid, "-d", proxy == "pgbouncer")
                    time.sleep(0.5)
                    total = callgrind_total(proc.pid, since)
                    out["idle_per_s"][proxy] = round(total / a.instr_idle_s) if total is not None else None
                    log(f"  idle     {proxy:9} {fmt(out['idle_per_s'][proxy], ',')} instructions/s with no traffic")
            for rnd in range(1, a.instr_rounds + 1):
                for mix in mixes:
                    for mode in modes:
                        bmode, brow = self.baseline(mode)
                        cases = [("pgtenant", ROW_PGTENANT, mode)]
                        if bmode == mode:   # otherwise the baseline is measured in its own mode
                            cases.append(("pgbouncer", brow, mode))
                        for proxy, row, m in cases:
                            proc, port = targets[proxy]
                            spec = self.row_spec(mix, m, row)
                            common = dict(port=port, user=spec["user"], password=spec["password"],
                                          script=spec["script"], mode=m, clients=clients, threads=2, db=spec["db"])
                            # Warm-up until the proxy stops opening server connections: under callgrind a
                            # login to Postgres (SCRAM) costs millions of instructions, which must not land in
                            # the measured window.
                            seen = -1
                            for _ in range(6):
                                w = self.pgbench(**common, transactions=max(2, 200 // clients))
                                if w.get("error"):
                                    raise BenchError(f"instructions warm-up {proxy} {mix} {m}: {w['error']}")
                                time.sleep(1.0)
                                now = len(self.backend_pids(proc.pid))
                                if now == seen:
                                    break
                                seen = now
                            if method == "callgrind":
                                since = time.time() - 1
                                callgrind(proc.pid, "-z", proxy == "pgbouncer")
                                r = self.pgbench(**common, transactions=per_client, rate=rate, cpu_pid=proc.pid)
                                callgrind(proc.pid, "-d", proxy == "pgbouncer")
                                time.sleep(0.5)
                                total = callgrind_total(proc.pid, since)
                                r["instructions"] = total
                                r["instructions_per_tx"] = round(total / r["txns"]) if total and r.get("txns") else None
                            else:
                                r = self.pgbench(**common, transactions=per_client, rate=rate, cpu_pid=proc.pid,
                                                 perf=True)
                            r.update(proxy=proxy, row=row, mix=mix, mode=m, round=rnd)
                            out["runs"].append(r)
                            if r.get("error"):
                                log(f"  {mix:5} {m:8} {proxy:9} ERROR {r['error']}")
                            else:
                                log(f"  {mix:5} {m:8} {proxy:9} {fmt(r.get('instructions_per_tx'), ',')} instructions/tx"
                                    f"  ({r['txns']:,} tx, {fmt(r.get('cpu_us_per_tx'), '.0f')} us CPU/tx under "
                                    f"{method})")
        finally:
            for proc in procs:
                self.stop_proc(proc)
        summary = {}
        for r in out["runs"]:
            if r.get("error"):
                continue
            summary.setdefault(r["mix"], {}).setdefault(r["mode"], {}).setdefault(r["proxy"], []).append(
                r.get("instructions_per_tx"))
        out["summary"] = {mix: {mode: {proxy: median_or_none(v) for proxy, v in per.items()}
                                for mode, per in by_mode.items()} for mix, by_mode in summary.items()}
        out["ratios"] = []
        for mix in mixes:
            for mode in modes:
                bmode, _ = self.baseline(mode)
                pt = (out["summary"].get(mix, {}).get(mode) or {}).get("pgtenant")
                pb = (out["summary"].get(mix, {}).get(bmode) or {}).get("pgbouncer")
                out["ratios"].append({"mix": mix, "mode": mode, "baseline_mode": bmode, "pgtenant": pt,
                                      "pgbouncer": pb, "ratio": pt / pb if pt and pb else None})
        self.results["instructions"] = out

    # ---------------------------------------------------------------- login rate

    def part_login(self) -> None:
        a = self.args
        self.ensure_main_pgtenant()
        self.ensure_bouncer()
        key, pub = self.tmp / "jwt-key.pem", self.tmp / "jwt-pub.pem"
        self.run_cmd([self.tools["openssl"], "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                      "-out", str(key)], what="openssl genpkey")
        self.run_cmd([self.tools["openssl"], "pkey", "-in", str(key), "-pubout", "-out", str(pub)],
                     what="openssl pkey -pubout")
        rs_proc, rs_port, _ = self.start_pgtenant("pgtenant-rs256", a.pool, jwt=f'public_key_file = "{pub}"')
        try:
            rs_token = mint_rs256(self.tools["openssl"], key, self.tenant)
            got = self.psql_tcp(rs_port, CLIENT_USER, rs_token, "SELECT current_setting('app.tenant_id')").strip()
            if got != str(self.tenant):
                raise BenchError(f"RS256 sanity check: expected tenant {self.tenant}, got {got!r}")
            targets = [
                ("pgtenant HS256", self.pgtenant_main_port, CLIENT_USER, self.token, self.pgtenant_main.pid),
                ("pgtenant RS256", rs_port, CLIENT_USER, rs_token, rs_proc.pid),
                ("pgbouncer (auth plain)", self.bouncer_port, BOUNCER_USER, BOUNCER_PASSWORD, self.bouncer.pid),
                ("direct (scram-sha-256)", self.pgport, APP_USER, APP_PASSWORD, None),
            ]
            log(f"login rate: pgbench -C -c {a.login_clients} -j 2, {a.rounds} rounds x {a.duration} s, SELECT 1")
            runs = []
            for rnd in range(1, a.rounds + 1):
                for name, port, user, pw, pid in targets:
                    r = self.pgbench(port, user, pw, SCRIPT_LOGIN, "simple", a.login_clients, 2,
                                     duration=a.duration, connect_each=True, cpu_pid=pid)
                    r.update(row=name, round=rnd)
                    runs.append(r)
                    if r.get("error"):
                        log(f"  round {rnd} {name:24} ERROR {r['error']}")
                    else:
                        log(f"  round {rnd} {name:24} {r['tps']:9.1f} logins/s  proxy CPU/1k "
                            f"{fmt(r.get('proxy_cpu_s_per_1k'), '.4f')} s")
            summary = {}
            for name, *_ in targets:
                ok = [r for r in runs if r["row"] == name and not r.get("error")]
                summary[name] = {"logins_per_s": median_or_none([r["tps"] for r in ok]),
                                 "proxy_cpu_s_per_1k": median_or_none([r.get("proxy_cpu_s_per_1k") for r in ok]),
                                 "runs_ok": len(ok),
                                 "errors": [r["error"] for r in runs if r["row"] == name and r.get("error")][:3]}
            self.results["login"] = {"config": {"clients": a.login_clients, "rounds": a.rounds,
                                                "duration_s": a.duration, "rsa_bits": 2048},
                                     "runs": runs, "summary": summary}
        finally:
            self.stop_proc(rs_proc)

    # ---------------------------------------------------------------- idle / active clients

    def part_idle(self) -> None:
        a = self.args
        proc, port, admin = self.start_pgtenant("pgtenant-idle", a.pool)
        try:
            tokens = {t: mint_hs256(self.secret, t) for t in range(1, TENANTS + 1)}
            time.sleep(0.5)
            rss_before = proc_status_kib(proc.pid, "VmRSS")
            log(f"idle: opening {a.idle_clients:,} logged-in clients ({a.login_concurrency} logins in flight)")
            res = asyncio.run(idle_clients(port, admin, tokens, a.idle_clients, a.login_concurrency, proc.pid))
            res["rss_before_kib"] = rss_before
            res["clients_target"] = IDLE_TARGET_CLIENTS
            delta = res["rss_after_kib"] - rss_before
            res["rss_delta_kib"] = delta
            res["rss_per_client_kib"] = round(delta / res["connected"], 2) if res["connected"] else None
            if res["connected"] and res["connected"] < IDLE_TARGET_CLIENTS:
                res["rss_projected_10k_mib"] = round(
                    (rss_before + delta / res["connected"] * IDLE_TARGET_CLIENTS) / 1024, 1)
            res["threads"] = proc_status_kib(proc.pid, "Threads")
            time.sleep(2.0)   # the clients are closed: how much of it does the proxy give back?
            res["rss_after_close_kib"] = proc_status_kib(proc.pid, "VmRSS")
            self.results["idle"] = res
            log(f"  {res['connected']:,} connected in {res['connect_s']:.1f} s ({res['logins_per_s']:.0f}/s), "
                f"{res['failed']} failed; RSS {rss_before / 1024:.1f} -> {res['rss_after_kib'] / 1024:.1f} MiB "
                f"({fmt(res['rss_per_client_kib'])} KiB per client); admin /pools clients = {res.get('admin_clients')}")
        finally:
            self.stop_proc(proc)

    def part_active(self) -> None:
        a = self.args
        proc, port, admin = self.start_pgtenant("pgtenant-active", a.active_pool)
        try:
            tokens = {t: mint_hs256(self.secret, t) for t in range(1, TENANTS + 1)}
            log(f"active: {a.active_clients:,} clients on a pool of {a.active_pool}, "
                f"PK lookups in a loop for {a.duration} s")
            cpu0 = proc_cpu_seconds(proc.pid)
            res = asyncio.run(active_clients(port, admin, tokens, a.active_clients, a.login_concurrency,
                                             a.duration, self.maxk))
            res["proxy_cpu_s"] = round(proc_cpu_seconds(proc.pid) - cpu0, 2)
            res["pool"] = a.active_pool
            res["rss_after_mib"] = round(proc_status_kib(proc.pid, "VmRSS") / 1024, 1)
            # pgtenant's own view (this instance served only this test): pool wait and backend hold time
            try:
                _, text = http_get(f"http://127.0.0.1:{admin}/metrics")
                res["proxy_histograms_ms"] = {
                    short: {f"p{int(q * 100)}": (round(v * 1000, 3) if (v := histogram_quantile(text, name, q))
                                                 is not None else None) for q in (0.5, 0.99)}
                    for short, name in (("pool_wait", "pgtenant_pool_wait_seconds"),
                                        ("transaction", "pgtenant_transaction_duration_seconds"))}
            except OSError:
                pass
            self.results["active"] = res
            log(f"  {res['transactions']:,} transactions ({res['tps']:.0f}/s), errors {res['errors']}, "
                f"wrong-tenant rows {res['wrong_rows']}, p50 {fmt(res['p50_ms'])} ms, p99 {fmt(res['p99_ms'])} ms")
        finally:
            self.stop_proc(proc)

    # ---------------------------------------------------------------- run / report

    def teardown(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as e:  # keep tearing down
                print(f"warning: stopping {proc.name}: {e}", file=sys.stderr)
        self.procs.clear()
        if self.tmp and self.tmp.exists():
            if self.args.keep:
                log(f"kept {self.tmp}")
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)

    def run(self) -> int:
        a = self.args
        started = datetime.datetime.now(datetime.timezone.utc)
        self.results["meta"] = {
            "started_utc": started.isoformat(timespec="seconds"),
            "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "cpu_model": cpu_model()},
            "args": {k: v for k, v in vars(a).items()},
            "git": git_describe(),
            "loadavg_start": loadavg(),
        }
        t_start = time.monotonic()

        def body() -> None:
            self.build()
            self.ensure_tools()
            self.make_tmp()
            self.prepare_binary()
            self.start_postgres()
            self.load_data()
            for part in PARTS:
                if part in a.parts:
                    getattr(self, f"part_{part}")()

        error = run_guarded(body, self.teardown)
        self.results["meta"]["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")
        self.results["meta"]["elapsed_s"] = round(time.monotonic() - t_start, 1)
        self.results["meta"]["loadavg_end"] = loadavg()
        if error:
            self.results["error"] = error
        self.results["targets"] = self.targets()
        report = self.report()
        self.results["report"] = report.splitlines()
        print()
        print(report)
        path = self.save(started)
        if path:
            print(f"\nresults: {path.relative_to(REPO)} (and bench/results/latest.json)")
        if error:
            print(f"\nbenchmark FAILED: {error}", file=sys.stderr)
            return 1
        return 0

    def save(self, started: datetime.datetime) -> Path | None:
        if not any(k in self.results for k in PARTS):
            return None
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        text = json.dumps(self.results, indent=2, default=str) + "\n"
        path.write_text(text)
        (RESULTS_DIR / "latest.json").write_text(text)
        return path

    def targets(self) -> list[dict]:
        out = []
        pb, wr = self.results.get("pgbench"), self.results.get("writes")
        if pb:
            for r in pb["ratios"]:
                mode, base = r["mode"], r["baseline"]
                out.append({"name": f"TPS pgtenant / {base} ({mode}, read mix)", "value": r["tps_ratio"],
                            "target": f">= {TARGET_TPS[mode]:.2f}",
                            "pass": (r["tps_ratio"] >= TARGET_TPS[mode]) if r["tps_ratio"] is not None else None,
                            "note": None if r["tps_ratio"] is not None else "missing figure"})
            for r in pb["ratios"]:
                if r["mode"] in ("simple", "extended"):
                    out.append({"name": f"proxy CPU/tx pgtenant / {r['baseline']} ({r['mode']}, read mix)",
                                "value": r["cpu_ratio"], "target": f"<= {TARGET_CPU:.2f}",
                                "pass": (r["cpu_ratio"] <= TARGET_CPU) if r["cpu_ratio"] is not None else None,
                                "note": None if r["cpu_ratio"] is not None else "missing figure"})
        if wr:
            for r in wr["ratios"]:
                out.append({"name": f"TPS pgtenant / {r['baseline']} ({r['mode']}, write mix)", "value": r["tps_ratio"],
                            "target": f">= {TARGET_TPS[r['mode']]:.2f}",
                            "pass": (r["tps_ratio"] >= TARGET_TPS[r["mode"]]) if r["tps_ratio"] is not None else None,
                            "note": None if r["tps_ratio"] is not None else "missing figure"})
        if pb and wr:
            read = {r["mode"]: r["tps_ratio"] for r in pb["ratios"]}
            for r in wr["ratios"]:
                rr, w = read.get(r["mode"]), r["tps_ratio"]
                drift = (w / rr - 1) if (rr and w) else None
                out.append({"name": f"write-mix ratio vs read-mix ratio ({r['mode']}): "
                                    f"{fmt(w, '.2f')} vs {fmt(rr, '.2f')}",
                            "value": drift, "value_fmt": "+.1%", "target": f"within ±{TARGET_WRITE_DRIFT:.0%}",
                            "pass": abs(drift) <= TARGET_WRITE_DRIFT if drift is not None else None,
                            "note": "relative difference" if drift is not None else "missing figure"})
        if pb:
            for r in pb["ratios"]:
                for key, name, target in (("vs_bouncer_ctx", ROW_BOUNCER_CTX + " (4 round trips)", TARGET_VS_BOUNCER_CTX),
                                          ("vs_direct64", ROW_DIRECT + ", 4 round trips", TARGET_VS_DIRECT)):
                    v = r.get(key)
                    out.append({"name": f"[issue 7] TPS pgtenant / {name} ({r['mode']})", "value": v,
                                "target": f">= {target:.2f}", "pass": (v >= target) if v is not None else None,
                                "note": "earlier, weaker baseline" if v is not None else
                                ("not supported by this PgBouncer" if r["mode"] == "prepared" and key == "vs_bouncer_ctx"
                                 else "missing figure")})
        idle = self.results.get("idle")
        if idle and idle.get("connected"):
            if idle["connected"] >= IDLE_TARGET_CLIENTS:
                val, note = idle["rss_after_kib"] / 1024, f"{idle['connected']:,} clients"
            else:
                val = idle.get("rss_projected_10k_mib")
                note = f"projected from {idle['connected']:,} clients"
            ok = val is not None and val <= TARGET_IDLE_MIB and idle["failed"] == 0
            out.append({"name": "proxy RSS, 10,000 idle clients (MiB)", "value": val,
                        "target": f"<= {TARGET_IDLE_MIB:.0f}", "pass": ok, "note": note})
        act = self.results.get("active")
        if act:
            out.append({"name": f"errors, {act['clients']:,} active clients on pool {act['pool']}",
                        "value": act["errors"] + act["wrong_rows"] + act["connect_failed"], "target": "= 0",
                        "pass": act["errors"] + act["wrong_rows"] + act["connect_failed"] == 0,
                        "note": "errors + failed logins + wrong-tenant rows"})
        return out

    def mix_report(self, key: str) -> list[str]:
        pb = self.results[key]
        c = pb["config"]
        title = ("read mix (pgbench): one primary-key lookup per transaction" if pb["mix"] == "read" else
                 "write mix (writes): INSERT ... RETURNING (nextval default) + UPDATE ... RETURNING per transaction")
        lines = ["", f"{title}", f"  {c['clients']} clients (-j {c['threads']}; direct (8 connections): {c['pool']}), "
                 f"pool {c['pool']}, median of {c['rounds']} interleaved runs x {c['duration_s']} s; "
                 f"instructions/tx: {c['instructions']}"]
        rows = []
        for mode, per_row in pb["summary"].items():
            for row, s in per_row.items():
                note = f"{s['runs_failed']} run(s) failed: {s['errors'][0][:60]}" if s["runs_failed"] else ""
                rows.append([mode, row, s["script"] + ("" if s["db"] == "app" else f" @{s['db']}")
                             + (" +options" if s["options"] else ""),
                             fmt(s["tps"], ".0f"), fmt(s["lat_avg_ms"], ".3f"), fmt(s["p99_ms"], ".3f"),
                             fmt(s["cpu_us_per_tx"], ".1f"), fmt(s["user_us_per_tx"], ".1f"),
                             fmt(s["sys_us_per_tx"], ".1f"), fmt(s["ctx_switches_per_tx"], ".2f"),
                             fmt(s.get("syscalls_per_tx"), ".2f"), fmt(s.get("futex_per_tx"), ".2f"),
                             fmt(s.get("epoll_waits_per_tx"), ".2f"),
                             fmt(s["instructions_per_tx"], ",.0f"), fmt(s["other_cpu_pct"], ".0f"), note])
        lines.append(table(["mode", "row", "script", "TPS", "avg ms", "p99 ms", "CPU us/tx", "user", "sys",
                            "ctxsw/tx", "syscalls/tx", "futex/tx", "epoll_wait/tx", "instr/tx", "other %", "note"],
                           rows, right=set(range(3, 15))))
        others = [r.get("other_cpu_pct") for r in pb["runs"] if r.get("other_cpu_pct") is not None]
        if others:
            lines.append(f"  other %: CPU used by work outside the benchmark during a run, in % of all CPUs; over all "
                         f"runs median {statistics.median(others):.0f} %, max {max(others):.0f} %")
        lines.append("")
        rrows = []
        for r in pb["ratios"]:
            rrows.append([r["mode"], r["baseline"], fmt(r["tps_ratio"], ".2f", "n/a"), f">= {TARGET_TPS[r['mode']]:.2f}",
                          fmt(r["cpu_ratio"], ".2f", "n/a"),
                          f"<= {TARGET_CPU:.2f}" if r["mode"] != "prepared" else "-",
                          fmt(r["pgtenant_vs_direct8"], ".2f", "n/a"), fmt(r["baseline_vs_direct8"], ".2f", "n/a"),
                          fmt(r.get("vs_bouncer_ctx"), ".2f", "n/a") if "vs_bouncer_ctx" in r else "",
                          fmt(r.get("vs_direct64"), ".2f", "n/a") if "vs_direct64" in r else ""])
        lines.append(table(["mode", "pgtenant vs (PgBouncer same work)", "TPS ratio", "wanted", "CPU/tx ratio",
                            "wanted", "pgtenant/direct8", "pgbouncer/direct8", "vs 4-RT pgbouncer", "vs direct64"],
                           rrows, right={2, 3, 4, 5, 6, 7, 8, 9}))
        brows = [[r["mode"], fmt(b["pgtenant_tps_gain"], ".2f", "n/a"), fmt(b["baseline_tps_gain"], ".2f", "n/a"),
                  fmt(b["tps_ratio"], ".2f", "n/a"), fmt(b["cpu_ratio"], ".2f", "n/a")]
                 for r in pb["ratios"] if (b := r.get("batch"))]
        if brows:
            lines += ["", "SCHED_BATCH (both proxies' threads, same processes, interleaved):"]
            lines.append(table(["mode", "pgtenant TPS batch/normal", "baseline TPS batch/normal",
                                "TPS ratio, both batch", "CPU/tx ratio, both batch"], brows, right={1, 2, 3, 4}))
        if self.args.reuseport_processes:
            fleet_row = ROW_FLEET.format(n=self.args.reuseport_processes)
            for mode, per_row in pb["summary"].items():
                n = self.args.reuseport_processes
                f, one = per_row.get(fleet_row), per_row.get(ROW_PGTENANT)
                bfleet = per_row.get(ROW_BOUNCER_FLEET.format(row=self.baseline(mode)[1], n=n))
                bone = per_row.get(self.baseline(mode)[1])

                def r(x, y, field):
                    return fmt(x[field] / y[field] if x and y and x[field] and y[field] else None, ".2f", "n/a")
                if f and one:
                    lines.append(f"{mode}: {n} pgtenant processes sharing the port / one: TPS {r(f, one, 'tps')}, "
                                 f"CPU/tx {r(f, one, 'cpu_us_per_tx')}; {n} PgBouncers / one: TPS "
                                 f"{r(bfleet, bone, 'tps')}, CPU/tx {r(bfleet, bone, 'cpu_us_per_tx')}; "
                                 f"{n} pgtenant / {n} PgBouncer: TPS {r(f, bfleet, 'tps')}, "
                                 f"CPU/tx {r(f, bfleet, 'cpu_us_per_tx')}")
        pm = pb.get("pgtenant_metrics") or {}
        if pm.get("transactions_total"):
            lines.append(f"pgtenant counted {pm['transactions_total']:.0f} transactions and "
                         f"{pm['context_injections_total']:.0f} context injections (so far)")
        for n in pb.get("skipped", {}).values():
            lines.append(f"note: {n}")
        return lines

    def report(self) -> str:
        m = self.results["meta"]
        a = self.args
        lines = [f"pgtenant benchmark  {m['started_utc']}  {m['host']['cpus']} CPUs ({m['host']['cpu_model']})",
                 f"postgres {m.get('postgres', '?')}, pgbouncer {m.get('pgbouncer', 'not used')}, "
                 f"{m.get('pgtenant', {}).get('version', 'pgtenant ?')} ({m['git']})"]
        if m.get("loadavg_start"):
            lines.append(f"load average (1/5/15 min) at start {m['loadavg_start']}, at end {m.get('loadavg_end', '?')}; "
                         f"elapsed {fmt(m.get('elapsed_s'), '.0f')} s")
        if "table" in m:
            t = m["table"]
            lines.append(f"table bench: {t['rows']:,} rows, {t['tenants']} tenants, {t['size']}; lookup: {t['plan']}")
        for key in ("pgbench", "writes"):
            if self.results.get(key):
                lines += self.mix_report(key)
        ins = self.results.get("instructions")
        if ins:
            lines += ["", "instructions per transaction (proxy process, all threads)"]
            if ins.get("error"):
                lines.append(f"  error: {ins['error']}")
            else:
                how = ("perf stat -e instructions (user + kernel)" if ins["method"] == "perf" else
                       "callgrind (user-space instructions only; the kernel's share is not counted)")
                lines.append(f"  {how}; {ins['clients']} clients, {ins['transactions']:,} transactions per measurement "
                             f"at -R {ins['rate']} tx/s" + (f"; perf: {ins['perf_reason']}" if ins.get("perf_reason")
                                                           else ""))
                rows = [[r["mix"], r["mode"], fmt(r["pgtenant"], ",.0f"),
                         fmt(r["pgbouncer"], ",.0f") + ("" if r["baseline_mode"] == r["mode"]
                                                        else f" (-M {r['baseline_mode']})"),
                         fmt(r["ratio"], ".2f", "n/a")] for r in ins["ratios"]]
                lines.append(table(["mix", "mode", "pgtenant", "pgbouncer (same work)", "ratio"], rows,
                                   right={2, 3, 4}))
                idle = ins.get("idle_per_s") or {}
                if idle:
                    lines.append("  with no traffic: " + ", ".join(f"{k} {fmt(v, ',')} instructions/s"
                                                               for k, v in idle.items())
                                 + f" (included above: at {ins['rate']} tx/s that is idle/s / {ins['rate']} per transaction)")
        rt = self.results.get("roundtrips")
        if rt:
            lines += ["", f"round trips (strace, pgbench -t {a.rt_transactions} -c 8): per transaction"]
            rows = []
            for mix, by_mode in rt.items():
                for mode, per_row in by_mode.items():
                    for row, r in per_row.items():
                        if r.get("error"):
                            rows.append([mix, mode, row, "", "error", "", r["error"][:60]])
                        else:
                            rows.append([mix, mode, row, r["script"] + ("" if r["db"] == "app" else f" @{r['db']}"),
                                         fmt(r["backend_sends_per_txn"]), fmt(r["backend_recvs_per_txn"]),
                                         fmt(r["proxy_io_syscalls_per_txn"])])
            lines.append(table(["mix", "mode", "row", "script", "backend sends", "backend recvs",
                                "proxy I/O syscalls"], rows, right={4, 5, 6}))
        lg = self.results.get("login")
        if lg:
            c = lg["config"]
            lines += ["", f"login rate: pgbench -C (new connection per transaction), {c['clients']} clients, "
                          f"median of {c['rounds']} x {c['duration_s']} s"]
            rows = [[name, fmt(s["logins_per_s"], ".0f"), fmt(s["proxy_cpu_s_per_1k"], ".4f"),
                     (s["errors"][0][:60] if s["errors"] else "")] for name, s in lg["summary"].items()]
            lines.append(table(["target", "logins/s", "proxy CPU s/1k logins", "note"], rows, right={1, 2}))
        idle = self.results.get("idle")
        if idle:
            lines += ["", f"idle clients: {idle['connected']:,} of {idle['requested']:,} logged in "
                          f"({idle['failed']} failed) in {idle['connect_s']:.1f} s ({idle['logins_per_s']:.0f} logins/s, "
                          f"{idle['concurrency']} in flight)",
                      f"  proxy RSS {idle['rss_before_kib'] / 1024:.1f} MiB before, "
                      f"{idle['rss_after_kib'] / 1024:.1f} MiB after: {fmt(idle['rss_per_client_kib'])} KiB per client"
                      + (f", projected {idle['rss_projected_10k_mib']} MiB at 10,000"
                         if idle.get("rss_projected_10k_mib") else "")
                      + f"; {idle['rss_after_close_kib'] / 1024:.1f} MiB 2 s after they closed",
                      f"  sample queries ok {idle['sample_ok']}/{idle['sample']}; admin /pools clients "
                      f"{idle.get('admin_clients')}; proxy threads {idle['threads']}"]
            for e, n in list(idle.get("errors", {}).items())[:3]:
                lines.append(f"  login error x{n}: {e}")
        act = self.results.get("active")
        if act:
            lines += ["", f"active clients: {act['connected']:,} of {act['clients']:,} on a pool of {act['pool']} "
                          f"for {act['duration_s']} s: {act['transactions']:,} transactions ({act['tps']:.0f}/s), "
                          f"p50 {fmt(act['p50_ms'])} ms, p99 {fmt(act['p99_ms'])} ms",
                      f"  errors {act['errors']}, failed logins {act['connect_failed']}, wrong-tenant rows "
                      f"{act['wrong_rows']}, clients that ran >= 1 transaction {act['clients_served']:,}; "
                      f"pool mid-run {act.get('pool_sample')}; proxy CPU {act['proxy_cpu_s']} s"]
            h = act.get("proxy_histograms_ms")
            if h:
                lines.append(f"  pgtenant /metrics (histogram estimates): pool wait p50 {fmt(h['pool_wait']['p50'])} ms, "
                             f"p99 {fmt(h['pool_wait']['p99'])} ms; backend held per transaction p50 "
                             f"{fmt(h['transaction']['p50'])} ms, p99 {fmt(h['transaction']['p99'])} ms")
                lines.append("  (client-side latency includes queueing in the single-threaded Python client)")
            for e, n in list(act.get("error_kinds", {}).items())[:3]:
                lines.append(f"  error x{n}: {e}")
        tg = self.results.get("targets")
        if tg:
            lines += ["", "targets"]
            rows = [[t["name"], fmt(t["value"], t.get("value_fmt", ".2f"), "n/a") if not isinstance(t["value"], int)
                     else str(t["value"]),
                     t["target"], {True: "PASS", False: "MISS", None: "-"}[t["pass"]], t.get("note") or ""]
                    for t in tg]
            lines.append(table(["target", "value", "wanted", "", "note"], rows, right={1}))
        if self.results.get("error"):
            lines += ["", f"ERROR: {self.results['error']}"]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# a minimal asyncio Postgres client (startup, cleartext password, simple query)


class PgError(Exception):
    pass


def parse_error_fields(body: bytes) -> str:
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return f"{fields.get('S', 'ERROR')} {fields.get('C', '?????')}: {fields.get('M', '')}"


class PgConn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, user: str, password: str, timeout: float = 30.0) -> "PgConn":
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        conn = cls(reader, writer)
        try:
            await asyncio.wait_for(conn._startup(user, password), timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _read(self) -> tuple[bytes, bytes]:
        hdr = await self.reader.readexactly(5)
        (n,) = struct.unpack("!i", hdr[1:])
        return hdr[:1], (await self.reader.readexactly(n - 4) if n > 4 else b"")

    def _send(self, typ: bytes, body: bytes) -> None:
        self.writer.write(typ + struct.pack("!i", len(body) + 4) + body)

    async def _startup(self, user: str, password: str) -> None:
        params = b"user\0" + user.encode() + b"\0database\0app\0\0"
        body = struct.pack("!i", 196608) + params
        self.writer.write(struct.pack("!i", len(body) + 4) + body)
        await self.writer.drain()
        while True:
            typ, body = await self._read()
            if typ == b"R":
                (code,) = struct.unpack("!i", body[:4])
                if code == 3:
                    self._send(b"p", password.encode() + b"\0")
                    await self.writer.drain()
                elif code != 0:
                    raise PgError(f"unexpected authentication request {code}")
            elif typ == b"E":
                raise PgError(parse_error_fields(body))
            elif typ == b"Z":
                return

    async def query(self, sql: str) -> list[list[bytes | None]]:
        self._send(b"Q", sql.encode() + b"\0")
        await self.writer.drain()
        rows, err = [], None
        while True:
            typ, body = await self._read()
            if typ == b"D":
                (ncols,) = struct.unpack("!h", body[:2])
                pos, row = 2, []
                for _ in range(ncols):
                    (ln,) = struct.unpack("!i", body[pos:pos + 4])
                    pos += 4
                    if ln < 0:
                        row.append(None)
                    else:
                        row.append(body[pos:pos + ln])
                        pos += ln
                rows.append(row)
            elif typ == b"E":
                err = parse_error_fields(body)
            elif typ == b"Z":
                break
        if err:
            raise PgError(err)
        return rows

    def close(self) -> None:
        try:
            if not self.writer.is_closing():
                self._send(b"X", b"")
            self.writer.close()
        except Exception:
            pass


async def open_clients(port: int, tokens: dict[int, str], n: int, concurrency: int):
    """Opens n logged-in clients, client i on tenant 1 + i % 100; at most `concurrency` logins at once."""
    sem = asyncio.Semaphore(concurrency)
    conns: list[tuple[PgConn, int]] = []
    errors: collections.Counter = collections.Counter()

    async def one(i: int):
        tenant = 1 + i % TENANTS
        async with sem:
            try:
                conns.append((await PgConn.connect(port, CLIENT_USER, tokens[tenant]), tenant))
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, PgError) as e:
                errors[(type(e).__name__ + ": " + str(e))[:160]] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return conns, errors, time.perf_counter() - t0


async def admin_json(admin: int, path: str):
    loop = asyncio.get_running_loop()
    try:
        status, body = await loop.run_in_executor(None, http_get, f"http://127.0.0.1:{admin}{path}")
        return json.loads(body) if status == 200 else None
    except (OSError, ValueError):
        return None


async def idle_clients(port: int, admin: int, tokens: dict[int, str], n: int, concurrency: int, pid: int) -> dict:
    conns, errors, elapsed = await open_clients(port, tokens, n, concurrency)
    try:
        await asyncio.sleep(2.0)   # let the proxy settle (freed login buffers, etc.)
        rss_after = proc_status_kib(pid, "VmRSS")
        pools = await admin_json(admin, "/pools")
        # every connection is alive and logged in: query a sample of them
        sample = random.sample(conns, min(200, len(conns)))
        sample_ok = 0
        for conn, tenant in sample:
            try:
                rows = await asyncio.wait_for(conn.query("SELECT current_setting('app.tenant_id')"), 30)
                if rows and rows[0][0] == str(tenant).encode():
                    sample_ok += 1
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, PgError) as e:
                errors[("sample query: " + type(e).__name__ + ": " + str(e))[:160]] += 1
        return {"requested": n, "connected": len(conns), "failed": n - len(conns), "concurrency": concurrency,
                "connect_s": round(elapsed, 2), "logins_per_s": round(len(conns) / elapsed, 1) if elapsed else None,
                "rss_after_kib": rss_after, "admin_clients": pools.get("clients") if pools else None,
                "sample": len(sample), "sample_ok": sample_ok, "errors": dict(errors.most_common(5))}
    finally:
        for conn, _ in conns:
            conn.close()
        await asyncio.sleep(0.5)


async def active_clients(port: int, admin: int, tokens: dict[int, str], n: int, concurrency: int,
                         duration: float, maxk: int) -> dict:
    conns, login_errors, login_s = await open_clients(port, tokens, n, concurrency)
    latencies: list[float] = []
    errors: collections.Counter = collections.Counter()
    counts = {"wrong_rows": 0, "served": 0}
    start = time.monotonic()
    stop = start + duration

    async def worker(conn: PgConn, tenant: int, seed: int):
        rnd = random.Random(seed)
        done = 0
        while time.monotonic() < stop:
            row_id = rnd.randint(0, maxk) * TENANTS + tenant
            t0 = time.perf_counter()
            try:
                rows = await conn.query(LOOKUP_SQL.format(id=row_id))
            except PgError as e:     # the connection stays usable after an ErrorResponse
                errors[str(e)[:160]] += 1
                continue
            except (OSError, asyncio.IncompleteReadError) as e:
                errors[(type(e).__name__ + ": " + str(e))[:160]] += 1
                return
            latencies.append(time.perf_counter() - t0)
            done += 1
            if len(rows) != 1 or rows[0][1] != str(tenant).encode():
                counts["wrong_rows"] += 1
        if done:
            counts["served"] += 1

    async def sample_pool():
        await asyncio.sleep(duration / 2)
        return await admin_json(admin, "/pools")

    try:
        sampler = asyncio.ensure_future(sample_pool())
        try:
            await asyncio.wait_for(asyncio.gather(*(worker(c, t, i) for i, (c, t) in enumerate(conns))),
                                   duration + 120)
        except asyncio.TimeoutError:
            errors["workers still blocked 120 s after the end of the run (hang)"] += 1
        elapsed = time.monotonic() - start
        pool = await sampler
    finally:
        for conn, _ in conns:
            conn.close()
        await asyncio.sleep(0.5)
    latencies.sort()
    pool_sample = None
    if pool:
        p = (pool.get("pools") or [{}])[0]
        pool_sample = {"clients": pool.get("clients"), "busy": p.get("busy"), "idle": p.get("idle"),
                       "waiting": p.get("waiting")}
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    all_errors = collections.Counter(errors)
    all_errors.update({"login: " + k: v for k, v in login_errors.items()})
    return {"clients": n, "connected": len(conns), "connect_failed": n - len(conns), "login_s": round(login_s, 2),
            "duration_s": duration, "transactions": len(latencies), "tps": len(latencies) / elapsed if elapsed else 0,
            "errors": sum(errors.values()), "wrong_rows": counts["wrong_rows"], "clients_served": counts["served"],
            "p50_ms": round(p50 * 1000, 3) if p50 is not None else None,
            "p99_ms": round(p99 * 1000, 3) if p99 is not None else None,
            "max_ms": round(latencies[-1] * 1000, 3) if latencies else None,
            "pool_sample": pool_sample, "error_kinds": dict(all_errors.most_common(5))}


# --------------------------------------------------------------------------------------------------


def run_guarded(body, teardown) -> str | None:
    """Runs body(), then teardown() whatever happened; returns what went wrong, or None."""
    error = None
    try:
        body()
    except BenchError as e:
        error = str(e)
    except KeyboardInterrupt:
        error = "interrupted"
    except Exception as e:  # a bug or an unexpected failure: still tear down and report
        import traceback
        traceback.print_exc()
        error = f"{type(e).__name__}: {e}"
    finally:
        try:
            teardown()
        except KeyboardInterrupt:
            teardown()
    return error


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def git_describe() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (root: at least 65536); children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if os.geteuid() == 0 and hard != resource.RLIM_INFINITY and hard < 65536:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))
            return
        except (ValueError, OSError):
            pass
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="pgtenant benchmark: pgbench read and write mixes vs PgBouncer's best "
                                            "same-work configuration and direct, instructions per transaction, "
                                            "login rate, idle/active connection scale. See bench/README.md.")
    p.add_argument("--quick", action="store_true",
                   help="short runs (2 s), fewer instruction-count transactions, 2,000 idle clients: a smoke run")
    p.add_argument("--no-build", action="store_true", help="do not run cargo build; use the existing binary")
    p.add_argument("--pgtenant", metavar="PATH", help="pgtenant binary (default target/release/pgtenant)")
    p.add_argument("--only", "--parts", action="append", metavar="PARTS", dest="only",
                   help=f"run only these parts (repeatable or comma-separated): {', '.join(PARTS)}")
    p.add_argument("--duration", type=float, metavar="SECS",
                   help="seconds per timed run: pgbench, writes, login, active (default 4, --quick 2)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per row, the median is reported (default 3)")
    p.add_argument("--modes", default=",".join(MODES), help="pgbench -M modes (default simple,extended,prepared)")
    p.add_argument("--extra-rows", action="store_true",
                   help="also run 'pgbouncer plain' (no context) and 'pgbouncer connect_query' in simple mode")
    p.add_argument("--clients", type=int, default=64, help="pgbench clients (default 64)")
    p.add_argument("--threads", type=int, default=2, help="pgbench threads (default 2)")
    p.add_argument("--worker-threads", type=int, default=1,
                   help="pgtenant's server.worker_threads (default 1: one thread, like PgBouncer; 0: one per core)")
    p.add_argument("--sched-batch", action="store_true",
                   help="also run pgtenant and its PgBouncer baseline with their threads switched to SCHED_BATCH "
                        "(chrt), interleaved with the normal rows of the same processes")
    p.add_argument("--reuseport-processes", type=int, default=0, metavar="N",
                   help="also run the read mix through N single-threaded pgtenant processes sharing one port "
                        "(server.so_reuseport), pool / N each: one row, interleaved")
    p.add_argument("--pool", type=int, default=8,
                   help="backend pool size of pgtenant and PgBouncer, and the clients of 'direct (8 connections)' "
                        "(default 8)")
    p.add_argument("--rows", type=int, default=1_000_000, help="rows in the bench table (default 1,000,000)")
    p.add_argument("--write-rows", type=int, default=None,
                   help="preloaded rows in bench_write, the write mix's table (default --rows / 10)")
    p.add_argument("--tenant", type=int, default=7, help="tenant of the pgbench client token (default 7)")
    p.add_argument("--instr-method", choices=["auto", "perf", "callgrind"], default="auto",
                   help="instructions part: perf stat (needs CPU counters) or callgrind (default: perf when it "
                        "can count instructions, else callgrind)")
    p.add_argument("--instr-transactions", type=int,
                   help="transactions per instruction-count measurement (default 1,000, --quick 400)")
    p.add_argument("--instr-clients", type=int, default=8, help="pgbench clients in the instructions part (default 8)")
    p.add_argument("--instr-rate", type=int, default=250,
                   help="pgbench -R (transactions/s) in the instructions part, below what the proxy sustains under "
                        "callgrind (default 250)")
    p.add_argument("--instr-rounds", type=int, default=1, help="measurements per case, the median is reported (default 1)")
    p.add_argument("--instr-idle-s", type=float, default=3.0,
                   help="seconds of no traffic over which callgrind measures each proxy's idle instructions (default 3)")
    p.add_argument("--idle-clients", type=int, help="idle clients (default 10,000, --quick 2,000)")
    p.add_argument("--active-clients", type=int, default=2000, help="active clients (default 2,000)")
    p.add_argument("--active-pool", type=int, default=20, help="pool size for the active test (default 20)")
    p.add_argument("--login-clients", type=int, default=8, help="pgbench -C clients (default 8)")
    p.add_argument("--login-concurrency", type=int, default=200,
                   help="logins in flight while opening idle/active clients (default 200)")
    p.add_argument("--rt-transactions", type=int, default=200,
                   help="transactions per client (8 clients) in the strace round-trip runs (default 200)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    a = p.parse_args(argv)
    a.duration = a.duration or (2.0 if a.quick else 4.0)
    if a.duration < 1:
        p.error("--duration must be at least 1 s")
    a.duration = int(a.duration)
    a.rounds = a.rounds or 3
    a.idle_clients = a.idle_clients or (2000 if a.quick else 10_000)
    a.instr_transactions = a.instr_transactions or (400 if a.quick else 1000)
    parts = []
    for item in a.only or PARTS:
        for part in item.split(","):
            part = part.strip()
            if part not in PARTS:
                p.error(f"--only: unknown part {part!r} (choose from {', '.join(PARTS)})")
            if part not in parts:
                parts.append(part)
    a.parts = parts
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    for m in a.modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r}")
    if a.rows < TENANTS or a.rows % TENANTS:
        p.error(f"--rows must be a positive multiple of {TENANTS}")
    if a.write_rows is None:
        a.write_rows = max(TENANTS, a.rows // 10 // TENANTS * TENANTS)
    if a.write_rows < TENANTS or a.write_rows % TENANTS:
        p.error(f"--write-rows must be a positive multiple of {TENANTS}")
    if not set(parts) & {"writes", "roundtrips", "instructions"}:
        a.write_rows = 0     # no write table needed
    if not 1 <= a.tenant <= TENANTS:
        p.error(f"--tenant must be 1..{TENANTS}")
    return a


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    raise_fd_limit()

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
