#!/usr/bin/env python3
"""Prints the figures of a bench/run.py results file as Markdown tables (for docs/benchmarks.md).

    python3 bench/markdown.py                       # bench/results/latest.json
    python3 bench/markdown.py bench/results/<timestamp>.json

Every figure comes from the JSON as run.py stored it (medians of the interleaved runs); nothing is
recomputed except the write-mix drift, which is the same division run.py's targets table makes.
Python 3.11 standard library only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (bench/run.py: row names and targets)


def f(v, spec: str = ".0f", none: str = "–") -> str:
    return none if v is None else format(v, spec)


def md_table(headers: list[str], rows: list[list[str]], right_from: int = 1) -> list[str]:
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---" if i < right_from else "---:" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def script_cell(s: dict) -> str:
    cell = f"`{s['script']}`"
    if s.get("db") and s["db"] != "app":
        cell += f" @`{s['db']}`"
    if s.get("options"):
        cell += " +options"
    return cell


def mix_tables(res: dict, key: str) -> list[str]:
    pb = res[key]
    rows = []
    for mode, per_row in pb["summary"].items():
        for row, s in per_row.items():
            name = f"**{row}**" if row == run.ROW_PGTENANT else row
            rows.append([mode, name, script_cell(s), str(s["clients"]), f(s["tps"]), f(s["lat_avg_ms"], ".2f"),
                         f(s["p99_ms"], ".2f"), f(s["cpu_us_per_tx"], ".1f"), f(s["user_us_per_tx"], ".1f"),
                         f(s["sys_us_per_tx"], ".1f"), f(s["ctx_switches_per_tx"], ".2f"),
                         f(s["instructions_per_tx"], ",.0f"), f(s.get("other_cpu_pct"), ".0f")])
    lines = md_table(["mode", "row", "script", "clients", "TPS", "avg ms", "p99 ms", "proxy CPU µs/tx",
                      "user µs", "sys µs", "ctx sw/tx", "instr/tx (perf)", "other load %"], rows, right_from=3)
    lines.append("")
    rrows = []
    for r in pb["ratios"]:
        rrows.append([r["mode"], r["baseline"], f(r["tps_ratio"], ".2f"), f(r["cpu_ratio"], ".2f"),
                      f(r["pgtenant_vs_direct8"], ".2f"), f(r["baseline_vs_direct8"], ".2f")]
                     + ([f(r.get("vs_bouncer_ctx"), ".2f"), f(r.get("vs_direct64"), ".2f")] if "vs_bouncer_ctx" in r
                        else []))
    headers = ["mode", "baseline (PgBouncer, same work)", "TPS pgtenant / baseline", "CPU/tx pgtenant / baseline",
               "pgtenant / direct (8)", "baseline / direct (8)"]
    if pb["mix"] == "read":
        headers += ["pgtenant / pgbouncer+set_config (4 RT)", "pgtenant / direct (64, 4 RT)"]
    lines += md_table(headers, rrows, right_from=2)
    return lines


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else run.RESULTS_DIR / "latest.json"
    res = json.loads(path.read_text())
    m = res["meta"]
    out = [f"<!-- {path.name}: {m['started_utc']} .. {m.get('finished_utc')}, {m.get('elapsed_s')} s, "
           f"git {m['git']}, binary {m.get('pgtenant', {}).get('binary')} "
           f"(mtime {m.get('pgtenant', {}).get('mtime')}), load average {m.get('loadavg_start')} -> "
           f"{m.get('loadavg_end')} -->", ""]
    for key, title in (("pgbench", "Read mix"), ("writes", "Write mix")):
        if res.get(key):
            out += [f"**{title}**", ""] + mix_tables(res, key) + [""]
    ins = res.get("instructions")
    if ins and not ins.get("error"):
        out += [f"**Instructions per transaction** ({ins['method']}, {ins['transactions']:,} transactions at "
                f"{ins['rate']} tx/s, {ins['clients']} clients)", ""]
        rows = [[r["mix"], r["mode"], f(r["pgtenant"], ",.0f"),
                 f(r["pgbouncer"], ",.0f") + ("" if r["baseline_mode"] == r["mode"] else f" (-M {r['baseline_mode']})"),
                 f(r["ratio"], ".2f")] for r in ins["ratios"]]
        out += md_table(["mix", "mode", "pgtenant", "PgBouncer (same work)", "pgtenant / PgBouncer"], rows, 2)
        if ins.get("idle_per_s"):
            out += ["", "With no traffic: " + ", ".join(f"{k} {f(v, ',.0f')} instructions/s"
                                                        for k, v in ins["idle_per_s"].items()) + "."]
        out.append("")
    rt = res.get("roundtrips")
    if rt:
        rows = []
        for mix, by_mode in rt.items():
            for mode, per_row in by_mode.items():
                for row, r in per_row.items():
                    if r.get("error"):
                        rows.append([mix, mode, row, "", "error", "", r["error"][:60]])
                    else:
                        rows.append([mix, mode, row, script_cell(r), f(r["backend_recvs_per_txn"], ".2f"),
                                     f(r["backend_sends_per_txn"], ".2f"), f(r["proxy_io_syscalls_per_txn"], ".2f")])
        out += ["**Round trips per transaction** (strace)", ""]
        out += md_table(["mix", "mode", "row", "script", "backend recvs (round trips)", "backend sends",
                         "proxy I/O syscalls"], rows, right_from=4) + [""]
    lg = res.get("login")
    if lg:
        c = lg["config"]
        out += [f"**Login rate** (`pgbench -C`, {c['clients']} clients, median of {c['rounds']} x {c['duration_s']} s)", ""]
        out += md_table(["target", "logins/s", "proxy CPU s / 1k logins"],
                        [[name, f(s["logins_per_s"]), f(s["proxy_cpu_s_per_1k"], ".3f")]
                         for name, s in lg["summary"].items()]) + [""]
    idle = res.get("idle")
    if idle:
        out += [f"**Idle clients**: {idle['connected']:,} of {idle['requested']:,} logged in ({idle['failed']} failed) "
                f"in {idle['connect_s']:.1f} s; proxy RSS {idle['rss_before_kib'] / 1024:.1f} MiB before, "
                f"{idle['rss_after_kib'] / 1024:.1f} MiB with all connected ({f(idle['rss_per_client_kib'], '.2f')} KiB "
                f"per client), {idle['rss_after_close_kib'] / 1024:.1f} MiB 2 s after they closed; "
                f"{idle['sample_ok']} of {idle['sample']} sampled connections answered as their own tenant.", ""]
    act = res.get("active")
    if act:
        h = act.get("proxy_histograms_ms") or {}
        out += [f"**Active clients**: {act['connected']:,} of {act['clients']:,} on a pool of {act['pool']} for "
                f"{act['duration_s']} s: {act['transactions']:,} transactions, {act['errors']} errors, "
                f"{act['wrong_rows']} wrong-tenant rows, {act['connect_failed']} failed logins; client-side p50 "
                f"{f(act['p50_ms'], '.0f')} ms, p99 {f(act['p99_ms'], '.0f')} ms"
                + (f"; pgtenant's pool wait p50 {f(h['pool_wait']['p50'], '.0f')} ms, backend held per transaction "
                   f"p50 {f(h['transaction']['p50'], '.1f')} ms" if h else "") + ".", ""]
    tg = res.get("targets")
    if tg:
        rows = [[t["name"], f(t["value"], t.get("value_fmt", ".2f")) if not isinstance(t["value"], int)
                 else str(t["value"]), t["target"],
                 {True: "met", False: "**not met**", None: "–"}[t["pass"]]] for t in tg]
        out += ["**Targets**", ""] + md_table(["target", "value", "wanted", ""], rows, right_from=1) + [""]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
