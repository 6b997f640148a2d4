#!/usr/bin/env python3
"""Where a proxy's instructions go: self cost per function, and grouped, from the callgrind files
that `bench/run.py --only instructions --keep` leaves behind (docs/benchmarks.md, "Where
pgtenant's instructions go").

    python3 bench/run.py --no-build --worker-threads 1 --only instructions \\
        --modes simple,extended --instr-transactions 2000 --keep
    python3 bench/callgrind_groups.py /tmp/pgtenant-bench-XXXX/callgrind/pgtenant.PID
    python3 bench/callgrind_groups.py /tmp/pgtenant-bench-XXXX/callgrind/pgtenant.PID --part 2 \\
        --transactions 2000 --top 30

Callgrind writes one file per dump: `<prefix>.1` is everything before the first measurement,
then one per measurement, in the order run.py prints them. Without `--part` the script lists the
parts and their totals. Function names are compressed across the parts of one process (a name is
spelled out only the first time it appears, in whichever part), so every part is read for them.
"""
import argparse
import collections
import glob
import re
import sys

# First match wins: a function counts in the first group whose pattern its name matches.
GROUPS = [
    ("reading SQL (lexer, split, guard, pooling and transaction analysis)",
     r"pgtenant::(sql|guard)::|Lexer|eq_ignore_ascii|FlatMap|try_fold"),
    ("clocks and timers", r"Timespec|clock_gettime|tokio::runtime::time|Instant|sleep|MetricsBatch"),
    ("allocation and copies", r"malloc|free|memcpy|memmove|realloc|reserve_inner|alloc::"),
    ("tokio: I/O readiness, reads and writes, scheduling",
     r"tokio::|mio::|epoll|__pthread|syscall|recv|send|read|write"),
    ("pool and fair share", r"pgtenant::pool::|batch_semaphore|Mutex"),
    ("metrics", r"metrics"),
    ("session state machine and relay", r"pgtenant::(session|server|protocol|cancel|net)"),
]

NAME = re.compile(r"^(c?fn)=\((\d+)\)(?: (.*))?$")


def read(path, names, costs):
    """Records the function names `path` spells out; with `costs`, adds its self costs to it."""
    current, skip = None, False
    with open(path, errors="replace") as f:
        for line in f:
            m = NAME.match(line.rstrip("\n"))
            if m:
                kind, ident, name = m.groups()
                if name:
                    names[ident] = name
                if kind == "fn":
                    current = ident
                continue
            if line.startswith("calls="):
                skip = True  # the next cost line is the call's inclusive cost
                continue
            if line[:1].isdigit() or (line[:1] != "" and line[:1] in "+-*"):
                if skip:
                    skip = False
                    continue
                if costs is not None and current is not None:
                    fields = line.split()
                    if len(fields) >= 2:
                        costs[current] += int(fields[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prefix", help="a process's callgrind file without the part number")
    p.add_argument("--part", type=int, help="the dump to break down (default: list the parts)")
    p.add_argument("--transactions", type=int, default=2000, help="transactions the dump covers")
    p.add_argument("--top", type=int, default=25, help="functions to list")
    a = p.parse_args()
    files = sorted(glob.glob(a.prefix + ".*"), key=lambda f: int(f.rsplit(".", 1)[1]))
    if not files:
        sys.exit(f"no files {a.prefix}.*")
    names = {}
    for f in files + [a.prefix]:
        try:
            read(f, names, None)
        except FileNotFoundError:
            pass
    if a.part is None:
        for f in files:
            costs = collections.Counter()
            read(f, names, costs)
            print(f"{f}: {sum(costs.values()):,} instructions")
        return
    costs = collections.Counter()
    read(f"{a.prefix}.{a.part}", names, costs)
    total = sum(costs.values())
    n = a.transactions
    print(f"part {a.part}: {total:,} instructions, {total / n:,.0f} per transaction\n")
    groups = collections.Counter()
    for ident, c in costs.items():
        name = names.get(ident, ident)
        label = next((g for g, pat in GROUPS if re.search(pat, name)), "other")
        groups[label] += c
    for label, c in groups.most_common():
        print(f"{c / n:>8,.0f}  {100 * c / total:4.1f} %  {label}")
    print(f"\ntop {a.top} functions by self cost, per transaction:")
    for ident, c in costs.most_common(a.top):
        print(f"{c / n:>8,.0f}  {100 * c / total:4.1f} %  {names.get(ident, ident)[:140]}")


if __name__ == "__main__":
    main()
