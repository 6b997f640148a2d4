#!/usr/bin/env python3
"""pgtenant fairness benchmark (issue 9): one busy tenant must not starve another.

Two scenarios (--scenario flood|long|all, default all: both, one after the other, on the same cluster),
each on a pool of --pool (10) backend connections with tenant A (tenant_id 1) and tenant B (tenant_id 2):

  flood: A ("noisy") runs --noisy-clients (200) pgbench clients, each running
      `select pg_sleep(--slow-ms / 1000)` (50 ms) in a closed loop, so A alone keeps the pool full and
      about 190 of its transactions queued at any moment; B ("quiet") runs ONE client running
      `select count(*) from orders` in a loop. The question is how long B's fast query waits. With one
      FIFO queue B waits behind A's whole backlog (about noisy_clients x slow_ms / pool = 1 s); with
      per-tenant fair queuing it waits at most for the next connection to free up (about
      slow_ms / pool on average, at most slow_ms).
  long: A ("long") runs --long-clients (20) clients of `select pg_sleep(--long-ms / 1000)` (200 ms);
      B ("short") runs --short-clients (10) clients of `select count(*) from orders`. Both tenants
      queue. With one FIFO queue (or with turns alone) A's long transactions end up holding nearly
      every connection, since each one it gets stays taken while B's short queries keep handing theirs
      back, and B's queries wait for one of A's to end; when a freed connection goes to the waiting
      tenant holding the fewest, the pool stays shared and B's queries hardly wait.

Targets, each on a fresh proxy process (per scenario) in front of the same throwaway Postgres cluster:

  pgtenant               fair queuing, no [limits]
  pgtenant max_active=8  [limits] max_active_per_tenant = 8 (skipped when the binary rejects [limits])
  pgbouncer              transaction pooling, same pool size: the FIFO reference. PgBouncer has no tenant
                         context: both pgbench processes log in as run.py's PgBouncer client user, so
                         B's query sees no rows under RLS (the latency is what counts here).

Both tenants use pgbench -n -M simple with a custom script and per-transaction logging; A starts a
little earlier (--lead) and stops a little later than B, and the figures cover the window in which B
ran (transactions that completed inside it). Reported per scenario, target and tenant: TPS, latency
p50/p95/p99/max from the pgbench logs, and errors (failed transactions + clients pgbench aborted).

Setup (cluster, fixture, PgBouncer, tokens, process handling) is bench/run.py's, imported from it.
Results are printed and written to bench/results/fairness-<UTC timestamp>.json.
Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (bench/run.py: the shared harness)
from run import BenchError, log, fmt, percentile  # noqa: E402

TENANT_A, TENANT_B = 1, 2               # both exist in the fixture, 100 orders rows each
ROWS = 10_000                           # run.py's bench table, small: only PgBouncer's sanity check reads it
T_FAIR, T_LIMIT, T_BOUNCER = "pgtenant", "pgtenant max_active=8", "pgbouncer"
TARGETS = [T_FAIR, T_LIMIT, T_BOUNCER]
SCENARIOS = ["flood", "long"]
FAST_SQL = "select count(*) from orders;"


@dataclasses.dataclass(frozen=True)
class Role:
    """One tenant's pgbench load: `clients` clients looping `sql`."""
    key: str        # name in logs and the JSON ("noisy", "quiet", "long", "short")
    label: str      # table label, "A (noisy)"
    tenant: int
    clients: int
    threads: int
    sql: str


@dataclasses.dataclass(frozen=True)
class Scenario:
    """`first` starts --lead s before `measured` and stops --tail s after it; figures cover `measured`'s run."""
    key: str
    first: Role
    measured: Role
    sleep_ms: int   # pg_sleep of each of `first`'s transactions

    @property
    def roles(self) -> tuple[Role, Role]:
        return self.first, self.measured


def clients(n: int) -> str:
    return f"{n} client{'s' if n != 1 else ''}"


def sleep_sql(ms: int) -> str:
    return f"select pg_sleep({ms / 1000.0:g});"


def make_scenario(a: argparse.Namespace, key: str) -> Scenario:
    if key == "flood":
        return Scenario(key, Role("noisy", "A (noisy)", TENANT_A, a.noisy_clients, a.threads, sleep_sql(a.slow_ms)),
                        Role("quiet", "B (quiet)", TENANT_B, 1, 1, FAST_SQL), a.slow_ms)
    return Scenario(key, Role("long", "A (long)", TENANT_A, a.long_clients, a.threads, sleep_sql(a.long_ms)),
                    Role("short", "B (short)", TENANT_B, a.short_clients, min(a.threads, a.short_clients), FAST_SQL),
                    a.long_ms)


def scenario_config(sc: Scenario) -> dict:
    return {"sleep_ms": sc.sleep_ms,
            "tenants": {r.key: {"label": r.label, "tenant_id": r.tenant, "clients": r.clients,
                                "threads": r.threads, "sql": r.sql} for r in sc.roles}}


class FairBench(run.Bench):
    """run.Bench with extra TOML appended to every pgtenant config it writes, and a fresh directory for
    every PgBouncer start (one per scenario: pgbouncer, pgbouncer-2, ...)."""

    extra_config = ""

    def pg_owned_dir(self, name: str) -> Path:
        n, i = name, 1
        while (self.tmp / n).exists():
            i += 1
            n = f"{name}-{i}"
        return super().pg_owned_dir(n)

    def write_pgtenant_config(self, name, port, admin, pool, jwt):
        path = super().write_pgtenant_config(name, port, admin, pool, jwt)
        if self.extra_config:
            with open(path, "a") as f:
                f.write("\n# added by bench/fairness.py\n" + self.extra_config)
        return path


# --------------------------------------------------------------------------------------------------
# pgbench


def start_pgbench(b: FairBench, tag: str, port: int, user: str, password: str, script: Path,
                  clients: int, threads: int, secs: int, logdir: Path) -> dict:
    prefix = logdir / tag
    out, err = logdir / f"{tag}.stdout", logdir / f"{tag}.stderr"
    cmd = [b.tools["pgbench"], "-n", "-M", "simple", "-h", "127.0.0.1", "-p", str(port), "-U", user,
           "-c", str(clients), "-j", str(threads), "-T", str(secs), "-f", str(script),
           "--log", "--log-prefix", str(prefix), "app"]
    env = run.clean_env(PGPASSWORD=password, PGSSLMODE="disable", PGCONNECT_TIMEOUT="10")
    with open(out, "wb") as fo, open(err, "wb") as fe:
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, env=env, cwd=logdir,
                                 start_new_session=True)
    return {"tag": tag, "popen": popen, "prefix": prefix, "stdout": out, "stderr": err, "clients": clients,
            "start": time.time(), "end": None}


def wait_pgbench(p: dict, timeout: float) -> None:
    try:
        p["popen"].wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p["popen"].pid, signal.SIGKILL)   # its own session, started by us
        p["popen"].wait(10)
        p["timed_out"] = True
    p["end"] = time.time()


def read_log(prefix: Path) -> list[tuple[float, int | None]]:
    """(completion time as epoch seconds, latency in us or None for a failed transaction) per line.

    pgbench log line: client_id transaction_no time script_no time_epoch time_us [...]; time is the
    latency in microseconds (or "failed"/"serialization"/"deadlock" for a failed transaction)."""
    out = []
    for f in glob.glob(f"{prefix}.*"):
        if f.endswith((".stdout", ".stderr")):
            continue
        with open(f) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 6 or not parts[4].isdigit() or not parts[5].isdigit():
                    continue
                done = int(parts[4]) + int(parts[5]) / 1e6
                out.append((done, int(parts[2]) if parts[2].isdigit() else None))
    return out


def summarize(p: dict, window: tuple[float, float], tenant: str) -> dict:
    t0, t1 = window
    entries = read_log(p["prefix"])
    inside = [lat for done, lat in entries if t0 <= done <= t1]
    lats = sorted(lat for lat in inside if lat is not None)
    failed = sum(1 for lat in inside if lat is None)
    stdout = p["stdout"].read_text(errors="replace")
    stderr = p["stderr"].read_text(errors="replace")
    aborted = len(set(re.findall(r"client (\d+) (?:script \d+ )?aborted", stderr)))
    m = re.search(r"number of failed transactions: (\d+)", stdout)
    failed_total = int(m.group(1)) if m else 0
    rc = p["popen"].returncode
    err_lines = [l.strip() for l in stderr.splitlines()
                 if re.search(r"error|abort|fatal", l, re.I)]
    kinds: dict[str, int] = {}
    for l in err_lines:
        k = re.sub(r"client \d+", "client N", re.sub(r"^(pgbench: (error|fatal|warning): )+", "", l))[:200]
        kinds[k] = kinds.get(k, 0) + 1
    secs = t1 - t0

    def ms(v):
        return round(v / 1000.0, 3) if v is not None else None
    return {
        "tenant": tenant, "clients": p["clients"], "window_s": round(secs, 2),
        "transactions": len(lats), "transactions_whole_run": sum(1 for _, lat in entries if lat is not None),
        "tps": round(len(lats) / secs, 2) if secs > 0 else None,
        "p50_ms": ms(percentile(lats, 50)), "p95_ms": ms(percentile(lats, 95)),
        "p99_ms": ms(percentile(lats, 99)), "max_ms": ms(lats[-1] if lats else None),
        "failed_in_window": failed, "failed_total": failed_total, "aborted_clients": aborted,
        "errors": failed_total + aborted + (1 if p.get("timed_out") else 0),
        "pgbench_exit": rc, "timed_out": bool(p.get("timed_out")),
        "error_kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])[:5]),
    }


def run_scenario(b: FairBench, a: argparse.Namespace, sc: Scenario, name: str, port: int, creds: dict,
                 admin: int | None) -> dict:
    """Runs sc's two tenants against one target; creds = {tenant_id: (user, password)}."""
    label = f"{sc.key}/{name}"
    logdir = b.tmp / ("logs-" + re.sub(r"[^a-z0-9]+", "_", label.lower()))
    logdir.mkdir()
    first, measured = sc.roles
    for r in sc.roles:
        (logdir / f"{r.key}.sql").write_text(r.sql + "\n")
    first_secs = a.lead + a.secs + a.tail
    log(f"{label}: {first.key} {clients(first.clients)} x {first.sql} for {first_secs} s; "
        f"{measured.key} {clients(measured.clients)} x {measured.sql} after {a.lead} s for {a.secs} s")
    pa = start_pgbench(b, first.key, port, *creds[first.tenant], logdir / f"{first.key}.sql", first.clients,
                       first.threads, first_secs, logdir)
    pb = None
    samples: dict = {}
    try:
        time.sleep(a.lead)
        if pa["popen"].poll() is not None:
            err = pa["stderr"].read_text(errors="replace").strip().splitlines()[-3:]
            raise BenchError(f"{label}: the {first.key} pgbench exited early (exit {pa['popen'].returncode}): "
                             + " | ".join(err))
        pb = start_pgbench(b, measured.key, port, *creds[measured.tenant], logdir / f"{measured.key}.sql",
                           measured.clients, measured.threads, a.secs, logdir)
        sampler = None
        if admin:
            def sample():
                time.sleep(a.secs / 2)
                for path in ("/pools", "/tenants?top=5"):
                    try:
                        status, body = run.http_get(f"http://127.0.0.1:{admin}{path}", timeout=3)
                        if status == 200:
                            samples[path.split("?")[0].lstrip("/")] = json.loads(body)
                    except (OSError, ValueError):
                        pass
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
        wait_pgbench(pb, a.secs + 120)
        if sampler:
            sampler.join(10)
    except BaseException:   # Ctrl-C or a failure: do not leave our pgbench processes behind
        for p in (pb, pa):
            if p and p["popen"].poll() is None:
                os.killpg(p["popen"].pid, signal.SIGKILL)
                p["popen"].wait(10)
        raise
    wait_pgbench(pa, a.secs + a.lead + a.tail + 120)
    window = (pb["start"], pb["end"])
    res = {"name": name, "status": "ok", "port": port,
           "tenants": {first.key: summarize(pa, window, first.label),
                       measured.key: summarize(pb, window, measured.label)},
           "mid_run": samples}
    for r in sc.roles:
        s = res["tenants"][r.key]
        if s["transactions_whole_run"] == 0:
            kinds = "; ".join(s["error_kinds"]) or f"pgbench exit {s['pgbench_exit']}"
            raise BenchError(f"{label}: the {r.key} pgbench completed no transaction: {kinds}")
        log(f"  {r.key:5} {s['tps']:8.1f} tps  p50 {fmt(s['p50_ms'])}  p99 {fmt(s['p99_ms'])}  "
            f"max {fmt(s['max_ms'])} ms  errors {s['errors']}")
    return res


# --------------------------------------------------------------------------------------------------
# targets


def startup_error(msg: str) -> str:
    """The most telling line of a pgtenant startup failure."""
    lines = [l.strip() for l in msg.splitlines() if l.strip()]
    for l in lines:
        if re.search(r"limits|unknown (field|key)", l, re.I):
            return l[:300]
    return (lines[-1] if lines else msg)[:300]


def run_pgtenant_target(b: FairBench, a: argparse.Namespace, sc: Scenario, name: str, limits: str | None) -> dict:
    b.extra_config = f"[pool]\nquery_wait_timeout_ms = {a.wait_timeout_ms}\n"
    if limits:
        b.extra_config += f"\n[limits]\n{limits}\n"
    tag = re.sub(r"[^a-z0-9]+", "-", f"{sc.key} {name}".lower()).strip("-")
    try:
        proc, port, admin = b.start_pgtenant(tag, a.pool)
    except BenchError as e:
        if limits:
            err = startup_error(str(e).replace(str(b.tmp) + "/", ""))
            log(f"{sc.key}/{name}: skipped: {err}")
            return {"name": name, "status": "skipped", "error": err}
        raise
    try:
        tokens = {r.tenant: run.mint_hs256(b.secret, r.tenant) for r in sc.roles}
        for t, tok in tokens.items():
            got = b.psql_tcp(port, run.CLIENT_USER, tok,
                             "SELECT current_setting('app.tenant_id') || '|' || count(*) FROM orders").strip()
            if got != f"{t}|100":
                raise BenchError(f"{name} sanity check: tenant {t} expected '{t}|100', got {got!r}")
        res = run_scenario(b, a, sc, name, port, {t: (run.CLIENT_USER, tok) for t, tok in tokens.items()}, admin)
        res["config_extra"] = b.extra_config
        res["proxy_rss_mib"] = round(run.proc_status_kib(proc.pid, "VmRSS") / 1024, 1) if proc.alive() else None
        try:
            status, text = run.http_get(f"http://127.0.0.1:{admin}/metrics")
            if status == 200:
                res["pool_wait_ms"] = {f"p{int(q * 100)}": (round(v * 1000, 3) if (v := run.histogram_quantile(
                    text, "pgtenant_pool_wait_seconds", q)) is not None else None) for q in (0.5, 0.99)}
        except OSError:
            pass
        if not proc.alive():
            raise BenchError(f"{name} exited during the run:\n{proc.log_tail()}")
        return res
    finally:
        b.stop_proc(proc)
        b.extra_config = ""


def run_bouncer_target(b: FairBench, a: argparse.Namespace, sc: Scenario) -> dict:
    b.ensure_bouncer()
    try:
        creds = (run.BOUNCER_USER, run.BOUNCER_PASSWORD)
        res = run_scenario(b, a, sc, T_BOUNCER, b.bouncer_port, {r.tenant: creds for r in sc.roles}, None)
        res["note"] = ("no tenant context: both pgbench processes log in as the same PgBouncer user "
                       f"({run.BOUNCER_USER} -> {run.APP_USER}); B's query counts 0 rows under RLS")
        return res
    finally:
        b.stop_proc(b.bouncer)
        b.bouncer = None


# --------------------------------------------------------------------------------------------------
# report


def reading(key: str, sc: dict, pool: int) -> str:
    """The one-line reading under a scenario's table: what FIFO and fair queuing should give."""
    t = sc["config"]["tenants"]
    ms = sc["config"]["sleep_ms"]
    if key == "flood":
        n = t["noisy"]["clients"]
        return (f"reading: the pool can run at most {pool * 1000.0 / ms:.0f} of A's transactions/s. Behind one FIFO "
                f"queue B waits for A's backlog, about {n * ms / pool:.0f} ms; with fair queuing B waits at most for "
                f"the next free connection (<= {ms} ms, ~{ms / pool:.0f} ms on average).")
    n = min(t["long"]["clients"], pool)
    held = f"all {pool}" if n == pool else f"{n} of the {pool}"
    return (f"reading: A alone could keep {held} connections busy ({n * 1000.0 / ms:.0f} TPS of {ms} ms "
            f"transactions). Behind one FIFO queue (or with turns alone) A ends up holding nearly all of them and "
            f"B's queries wait for one of A's to end (up to {ms} ms); serving the tenant holding the fewest first "
            f"keeps the pool shared, so B hardly waits.")


def scenario_lines(key: str, sc: dict, pool: int) -> list[str]:
    t = sc["config"]["tenants"]
    desc = "; ".join(f"tenant {r['label'][0]} (tenant_id {r['tenant_id']}): {clients(r['clients'])} x "
                     f"{r['sql'].rstrip(';')}" for r in t.values())
    lines = [f"scenario {key}: {desc}"]
    rows = []
    for tg in sc["targets"]:
        if tg["status"] != "ok":
            rows.append([tg["name"], tg["status"] + " (below)", "", "", "", "", "", "", ""])
            continue
        for s in tg["tenants"].values():
            rows.append([tg["name"], s["tenant"], str(s["clients"]), fmt(s["tps"], ".1f"), fmt(s["p50_ms"], ".1f"),
                         fmt(s["p95_ms"], ".1f"), fmt(s["p99_ms"], ".1f"), fmt(s["max_ms"], ".1f"),
                         str(s["errors"])])
    lines.append(run.table(["target", "tenant", "clients", "TPS", "p50 ms", "p95 ms", "p99 ms", "max ms", "errors"],
                           rows, right={2, 3, 4, 5, 6, 7, 8}))
    lines += ["", reading(key, sc, pool)]
    for tg in sc["targets"]:
        if tg["status"] != "ok":
            lines.append(f"{tg['name']}: {tg['status']}: {tg.get('error', '')}")
            continue
        for role, s in tg["tenants"].items():
            for k, n in list(s["error_kinds"].items())[:2]:
                lines.append(f"{tg['name']} {role}: x{n} {k}")
        if tg.get("pool_wait_ms"):
            lines.append(f"{tg['name']}: /metrics pool wait p50 {fmt(tg['pool_wait_ms']['p50'])} ms, "
                         f"p99 {fmt(tg['pool_wait_ms']['p99'])} ms (all tenants)")
        if tg.get("note"):
            lines.append(f"{tg['name']}: {tg['note']}")
    return lines


def report(results: dict) -> str:
    c = results["config"]
    m = results["meta"]
    lines = [f"pgtenant fairness benchmark  {m['started_utc']}  {m['host']['cpus']} CPUs ({m['host']['cpu_model']})",
             f"postgres {m.get('postgres', '?')}, pgbouncer {m.get('pgbouncer', 'not used')}, "
             f"{m.get('pgtenant', {}).get('version', 'pgtenant ?')} ({m['git']})",
             f"pool {c['pool']}; figures over a {c['secs']} s window (while tenant B ran; A starts {c['lead_s']} s "
             f"before and stops {c['tail_s']} s after)"]
    ran = [(k, sc) for k, sc in results["scenarios"].items() if sc["targets"]]
    if not ran:
        return "\n".join(lines + ["", f"ERROR: {results.get('error', 'nothing ran')}"])
    for key, sc in ran:
        lines += [""] + scenario_lines(key, sc, c["pool"])
    if results.get("error"):
        lines += ["", f"ERROR: {results['error']}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="pgtenant fairness benchmark: a busy tenant next to another one, "
                                            "pgtenant vs PgBouncer. Scenario flood: many slow transactions vs one "
                                            "fast client; scenario long: long transactions vs short queries.")
    p.add_argument("--quick", action="store_true", help="8 s window instead of 20 s")
    p.add_argument("--scenario", choices=SCENARIOS + ["all"], default="all",
                   help="flood, long, or all: both, one after the other (default all)")
    p.add_argument("--secs", type=int, help="seconds tenant B runs (the measured window; default 20, --quick 8)")
    p.add_argument("--pool", type=int, default=10, help="backend pool size of every target (default 10)")
    p.add_argument("--noisy-clients", type=int, default=200, help="flood: clients of tenant A (default 200)")
    p.add_argument("--slow-ms", type=int, default=50, help="flood: pg_sleep of each of A's transactions, ms "
                                                           "(default 50)")
    p.add_argument("--long-clients", type=int, default=20, help="long: clients of tenant A (default 20)")
    p.add_argument("--long-ms", type=int, default=200, help="long: pg_sleep of each of A's transactions, ms "
                                                            "(default 200)")
    p.add_argument("--short-clients", type=int, default=10, help="long: clients of tenant B (default 10)")
    p.add_argument("--threads", type=int, default=2, help="pgbench threads of tenant A, and at most of B "
                                                          "(default 2)")
    p.add_argument("--lead", type=int, default=2, help="seconds tenant A runs before B starts (default 2)")
    p.add_argument("--tail", type=int, default=1, help="seconds tenant A runs after B stops (default 1)")
    p.add_argument("--wait-timeout-ms", type=int, default=60000,
                   help="pgtenant pool.query_wait_timeout_ms (default 60000: nobody times out)")
    p.add_argument("--only", metavar="LIST", help=f"comma-separated subset of: {', '.join(TARGETS)}")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--build", action="store_true", help="run cargo build --release -p pgtenant first "
                                                        "(default: only when the binary is missing)")
    g.add_argument("--no-build", action="store_true", help="never build (the default when the binary exists)")
    p.add_argument("--pgtenant", metavar="PATH", help="pgtenant binary (default target/release/pgtenant)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    a = p.parse_args(argv)
    a.secs = a.secs or (8 if a.quick else 20)
    if (a.secs < 2 or min(a.pool, a.noisy_clients, a.slow_ms, a.long_clients, a.long_ms, a.short_clients,
                          a.threads) < 1 or a.lead < 0 or a.tail < 0):
        p.error("--secs >= 2; --pool/--noisy-clients/--slow-ms/--long-clients/--long-ms/--short-clients/--threads "
                ">= 1; --lead/--tail >= 0")
    a.scenarios = SCENARIOS if a.scenario == "all" else [a.scenario]
    a.targets = TARGETS
    if a.only:
        a.targets = [t.strip() for t in a.only.split(",") if t.strip()]
        for t in a.targets:
            if t not in TARGETS:
                p.error(f"--only: unknown target {t!r} (choose from {', '.join(TARGETS)})")
    binary = Path(a.pgtenant) if a.pgtenant else run.REPO / "target" / "release" / "pgtenant"
    if a.pgtenant:
        a.no_build = True          # an explicit binary is never built here
    elif not a.build and not a.no_build:
        a.no_build = os.access(binary, os.X_OK)
    if a.build and a.pgtenant:
        p.error("--build builds target/release/pgtenant; do not combine it with --pgtenant")
    # what run.Bench reads from its args
    a.parts, a.rows, a.tenant = ["pgbench"], ROWS, 7
    return a


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    run.raise_fd_limit()

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    b = FairBench(a)
    started = datetime.datetime.now(datetime.timezone.utc)
    results: dict = {
        "meta": {"started_utc": started.isoformat(timespec="seconds"),
                 "host": {"cpus": os.cpu_count(), "cpu_model": run.cpu_model()},
                 "git": run.git_describe(), "args": {k: v for k, v in vars(a).items()}},
        "config": {"pool": a.pool, "secs": a.secs, "lead_s": a.lead, "tail_s": a.tail,
                   "wait_timeout_ms": a.wait_timeout_ms},
        "scenarios": {},
    }
    b.results = results   # run.Bench records versions in results["meta"]
    t_start = time.monotonic()

    def body() -> None:
        b.build()
        b.ensure_tools()
        b.make_tmp()
        b.prepare_binary()
        b.start_postgres()
        b.load_data()
        for key in a.scenarios:
            sc = make_scenario(a, key)
            done = results["scenarios"].setdefault(key, {"config": scenario_config(sc), "targets": []})["targets"]
            for name in a.targets:
                if name == T_FAIR:
                    done.append(run_pgtenant_target(b, a, sc, T_FAIR, None))
                elif name == T_LIMIT:
                    done.append(run_pgtenant_target(b, a, sc, T_LIMIT, "max_active_per_tenant = 8"))
                else:
                    done.append(run_bouncer_target(b, a, sc))

    error = run.run_guarded(body, b.teardown)
    results["meta"]["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results["meta"]["elapsed_s"] = round(time.monotonic() - t_start, 1)
    if error:
        results["error"] = error
    text = report(results)
    results["report"] = text.splitlines()
    print()
    print(text)
    if any(sc["targets"] for sc in results["scenarios"].values()):
        run.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = run.RESULTS_DIR / f"fairness-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nresults: {path.relative_to(run.REPO)}  ({results['meta']['elapsed_s']} s)")
    if error:
        print(f"\nfairness benchmark FAILED: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
