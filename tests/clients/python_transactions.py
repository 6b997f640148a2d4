"""Real-client suite, transactions (issue 15): each Python driver's own isolation setting must give
the level it asked for through pgtenant (checked inside the transaction with current_setting), a
real serialization failure (40001) between two clients, two-phase commit refused with 0A000 and
nothing left prepared, DISCARD ALL through the driver, and the parameter reports and backend pid a
direct connection would give.

Usage: python_transactions.py PORT TOKEN_TENANT_1 TOKEN_TENANT_2 [SESSION_MODE_PORT]
Prints one line per check; exits 1 if any failed.
"""

import asyncio
import sys
import traceback

PORT, TOKENS = int(sys.argv[1]), {1: sys.argv[2], 2: sys.argv[3]}
SESSION_PORT = int(sys.argv[4]) if len(sys.argv) > 4 else None
DSN = f"host=127.0.0.1 port={PORT} dbname=app user=alice"
MODES = ("select current_setting('transaction_isolation'), current_setting('transaction_read_only'), "
         "current_setting('transaction_deferrable'), current_setting('app.tenant_id')")
results = []


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def run(name, fn):
    try:
        fn()
        results.append((name, None))
    except Exception:  # noqa: BLE001
        results.append((name, traceback.format_exc(limit=3).strip().splitlines()[-1]))


def psycopg_isolation():
    import psycopg
    from psycopg import IsolationLevel

    for level, want in [(IsolationLevel.SERIALIZABLE, "serializable"), (IsolationLevel.REPEATABLE_READ, "repeatable read"),
                        (IsolationLevel.READ_COMMITTED, "read committed")]:
        for prepare in (None, 0):
            with psycopg.connect(DSN, password=TOKENS[1], prepare_threshold=prepare) as conn:
                conn.isolation_level = level
                conn.read_only = True
                conn.deferrable = True
                got = conn.execute(MODES).fetchone()
                check(got == (want, "on", "on", "1"), f"psycopg {level.name} prepare={prepare}: {got}")
                conn.commit()
                # pipeline mode: BEGIN and the query go out together
                with conn.pipeline():
                    cur = conn.execute(MODES)
                got = cur.fetchone()
                check(got == (want, "on", "on", "1"), f"psycopg pipeline {level.name}: {got}")
                conn.commit()


def psycopg_serialization_failure():
    import psycopg

    a = psycopg.connect(DSN, password=TOKENS[1])
    b = psycopg.connect(DSN, password=TOKENS[1])
    for c in (a, b):
        c.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
    try:
        for c in (a, b):
            check(c.execute("select count(*) from orders where amount > 91000").fetchone()[0] == 0, "leftover rows")
        failures = []
        for c, amount in ((a, 91001), (b, 91002)):
            try:
                c.execute("insert into orders (tenant_id, amount) values (1, %s)", (amount,))
                c.commit()
            except psycopg.errors.SerializationFailure as e:
                failures.append(e.sqlstate)
                c.rollback()
        check(failures == ["40001"], f"expected one 40001, got {failures}")
    finally:
        a.rollback()
        a.autocommit = True
        a.execute("delete from orders where amount > 91000")
        a.close()
        b.close()


def psycopg_two_phase_refused():
    import psycopg

    conn = psycopg.connect(DSN, password=TOKENS[1])
    try:
        conn.tpc_begin(conn.xid(1, "pgtenant-gtrid", "bq"))
        conn.execute("insert into orders (tenant_id, amount) values (1, 91111)")
        try:
            conn.tpc_prepare()
            raise AssertionError("tpc_prepare succeeded")
        except psycopg.Error as e:
            check(e.sqlstate == "0A000", f"tpc_prepare: {e.sqlstate} {e!r}")
    finally:
        conn.close()  # the server rolls the aborted transaction back
    with psycopg.connect(DSN, password=TOKENS[1], autocommit=True) as conn:
        n = conn.execute("select count(*) from orders where amount = 91111").fetchone()[0]
        check(n == 0, "the refused transaction's insert is visible")
        check(conn.execute("select count(*) from pg_prepared_xacts").fetchone()[0] == 0, "prepared transaction left behind")


def psycopg_discard_all():
    import psycopg

    with psycopg.connect(DSN, password=TOKENS[1], autocommit=True, prepare_threshold=0) as conn:
        conn.execute("set statement_timeout = '9s'")
        check(conn.execute("select %s::int + 1", (1,)).fetchone()[0] == 2, "prepared query")
        conn.execute("DISCARD ALL")  # extended protocol
        got = conn.execute("select current_setting('statement_timeout'), current_setting('app.tenant_id')").fetchone()
        check(got == ("0", "1"), f"after DISCARD ALL: {got}")


def psycopg_reports_and_pid():
    import psycopg

    with psycopg.connect(DSN, password=TOKENS[1], client_encoding="utf-8", options="-c DateStyle=iso,dmy") as conn:
        got = (conn.info.parameter_status("client_encoding"), conn.info.parameter_status("DateStyle"))
        check(got == ("UTF8", "ISO, DMY"), f"parameter reports: {got}")
        conn.execute("set client_encoding = 'latin1'")
        got = conn.info.parameter_status("client_encoding")
        check(got == "LATIN1", f"SET client_encoding report: {got}")
    check(SESSION_PORT is not None, "no session-mode port given")
    with psycopg.connect(f"host=127.0.0.1 port={SESSION_PORT} dbname=app user=alice", password=TOKENS[1]) as conn:
        pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        check(conn.info.backend_pid == pid, f"session mode: BackendKeyData pid {conn.info.backend_pid}, pg_backend_pid() {pid}")


def asyncpg_isolation():
    import asyncpg

    async def main():
        conn = await asyncpg.connect(host="127.0.0.1", port=PORT, user="alice", database="app", password=TOKENS[1])
        try:
            for iso, want in [("serializable", "serializable"), ("repeatable_read", "repeatable read"), ("read_committed", "read committed")]:
                async with conn.transaction(isolation=iso, readonly=True, deferrable=(iso == "serializable")):
                    got = tuple(await conn.fetchrow(MODES))
                    check(got == (want, "on", "on" if iso == "serializable" else "off", "1"), f"asyncpg {iso}: {got}")
            if SESSION_PORT:
                s = await asyncpg.connect(host="127.0.0.1", port=SESSION_PORT, user="alice", database="app", password=TOKENS[1])
                try:
                    pid = await s.fetchval("select pg_backend_pid()")
                    check(s.get_server_pid() == pid, f"asyncpg session mode pid {s.get_server_pid()} vs {pid}")
                finally:
                    await s.close()
            try:
                await conn.execute("PREPARE TRANSACTION 'asyncpg'")
                raise AssertionError("PREPARE TRANSACTION ran")
            except asyncpg.PostgresError as e:
                check(e.sqlstate == "0A000", f"prepare transaction: {e!r}")
        finally:
            await conn.close()

    asyncio.run(main())


def sqlalchemy_isolation():
    from sqlalchemy import create_engine, text

    for level, want in [("SERIALIZABLE", "serializable"), ("REPEATABLE READ", "repeatable read")]:
        engine = create_engine(f"postgresql+psycopg://alice:{TOKENS[1]}@127.0.0.1:{PORT}/app", isolation_level=level)
        with engine.connect() as c:
            got = tuple(c.execute(text(MODES)).one())
            check(got == (want, "off", "off", "1"), f"SQLAlchemy {level}: {got}")
            c.commit()
        with engine.connect().execution_options(isolation_level="READ COMMITTED", postgresql_readonly=True) as c:
            got = tuple(c.execute(text(MODES)).one())
            check(got == ("read committed", "on", "off", "1"), f"SQLAlchemy execution_options: {got}")
        engine.dispose()


checks = [("psycopg isolation_level/read_only/deferrable", psycopg_isolation),
          ("psycopg 40001 between two clients", psycopg_serialization_failure),
          ("psycopg tpc_prepare refused", psycopg_two_phase_refused),
          ("psycopg DISCARD ALL", psycopg_discard_all),
          ("psycopg parameter reports, session-mode pid", psycopg_reports_and_pid),
          ("asyncpg transaction(isolation=...)", asyncpg_isolation),
          ("SQLAlchemy isolation_level", sqlalchemy_isolation)]
for name, fn in checks:
    run(name, fn)
for name, err in results:
    print(f"client {name}: {'pass' if err is None else 'FAIL ' + err}")
sys.exit(1 if any(err for _, err in results) else 0)
