"""Real-client suite, Python drivers: psycopg 3 (server-side prepares from the first use),
psycopg_pool, asyncpg and the SQLAlchemy 2 ORM, each connected through pgtenant as tenant 1 and as
tenant 2. Each must see only its own rows, insert into its own tenant, fail to insert into the other
tenant, and run parameterised queries repeatedly (enough to be prepared server-side).

Usage: python_clients.py PORT TOKEN_TENANT_1 TOKEN_TENANT_2
Prints one line per client; exits 1 if any failed.
"""

import asyncio
import sys
import traceback

PORT, TOKENS = int(sys.argv[1]), {1: sys.argv[2], 2: sys.argv[3]}
DSN = f"host=127.0.0.1 port={PORT} dbname=app user=alice"
results = []


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def scenario_sync(conn, tenant, marker):
    """The shared scenario for DB-API style connections (psycopg)."""
    other = 3 - tenant
    with conn.cursor() as cur:
        for _ in range(10):
            cur.execute("select count(*), min(tenant_id), max(tenant_id) from orders where amount > %s", (0,))
            n, lo, hi = cur.fetchone()
            check(n > 0 and lo == tenant and hi == tenant, f"tenant {tenant} saw {n} rows of {lo}..{hi}")
        cur.execute("insert into orders (tenant_id, amount) values (%s, %s) returning tenant_id", (tenant, marker))
        check(cur.fetchone()[0] == tenant, "insert landed elsewhere")
    conn.commit()
    try:
        with conn.cursor() as cur:
            cur.execute("insert into orders (tenant_id, amount) values (%s, %s)", (other, marker))
        raise AssertionError("foreign insert succeeded")
    except AssertionError:
        raise
    except Exception as e:  # noqa: BLE001 - the driver's error class differs per driver
        check(getattr(e, "sqlstate", None) == "42501", f"foreign insert: {e!r}")
        conn.rollback()
    with conn.cursor() as cur:
        cur.execute("delete from orders where amount = %s", (marker,))
    conn.commit()


def run(name, fn):
    try:
        fn()
        results.append((name, None))
    except Exception:  # noqa: BLE001
        results.append((name, traceback.format_exc(limit=3).strip().splitlines()[-1]))


def psycopg3():
    import psycopg

    for tenant in (1, 2):
        with psycopg.connect(DSN, password=TOKENS[tenant], prepare_threshold=0) as conn:
            scenario_sync(conn, tenant, 8100 + tenant)
            # a small statement cache makes psycopg evict with DEALLOCATE, as busy apps do
            conn.prepared_max = 3
            for round_ in range(3):
                for k in range(8):
                    cur = conn.execute(f"select {k} + %s, count(*) from orders", (round_,))
                    v, n = cur.fetchone()
                    check(v == k + round_ and n > 0, f"query {k} round {round_}: {v} {n}")
            conn.commit()
        # set_config with %s (bound server-side): decided at Bind; kept like SET outside a transaction
        with psycopg.connect(DSN, password=TOKENS[tenant], autocommit=True) as conn:
            conn.execute("select set_config(%s, %s, false)", ("application_name", f"py{tenant}"))
            name = conn.execute("show application_name").fetchone()[0]
            check(name == f"py{tenant}", f"set_config(%s, %s, false) not kept: {name}")
            try:
                conn.execute("select set_config(%s, %s, false)", ("app.tenant_id", str(3 - tenant)))
                raise AssertionError("set_config of app.tenant_id with bind parameters succeeded")
            except psycopg.Error as e:
                check(e.sqlstate == "42501", f"bound app.tenant_id: {e!r}")
            lo, hi = conn.execute("select min(tenant_id), max(tenant_id) from orders").fetchone()
            check(lo == tenant and hi == tenant, f"after the refused set_config: tenants {lo}..{hi}")


def psycopg_pool():
    from psycopg_pool import ConnectionPool

    for tenant in (1, 2):
        with ConnectionPool(DSN, kwargs={"password": TOKENS[tenant]}, min_size=2, max_size=2, open=True) as pool:
            for i in range(3):
                with pool.connection() as conn:
                    scenario_sync(conn, tenant, 8200 + 10 * tenant + i)


def asyncpg_client():
    import asyncpg

    async def main():
        for tenant in (1, 2):
            conn = await asyncpg.connect(host="127.0.0.1", port=PORT, user="alice", database="app", password=TOKENS[tenant])
            try:
                for _ in range(10):
                    row = await conn.fetchrow("select count(*), min(tenant_id), max(tenant_id) from orders where tenant_id > $1", 0)
                    check(row[0] > 0 and row[1] == tenant and row[2] == tenant, f"tenant {tenant}: {tuple(row)}")
                got = await conn.fetchval("insert into orders (tenant_id, amount) values ($1, $2) returning tenant_id", tenant, 8300 + tenant)
                check(got == tenant, "insert landed elsewhere")
                try:
                    await conn.execute("insert into orders (tenant_id, amount) values ($1, 1)", 3 - tenant)
                    raise AssertionError("foreign insert succeeded")
                except asyncpg.PostgresError as e:
                    check(e.sqlstate == "42501", f"foreign insert: {e!r}")
                await conn.execute("delete from orders where amount = $1", 8300 + tenant)
            finally:
                await conn.close()

    asyncio.run(main())


def sqlalchemy_orm():
    from sqlalchemy import Integer, Numeric, String, create_engine, select
    from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

    class Base(DeclarativeBase):
        pass

    class Order(Base):
        __tablename__ = "orders"
        id: Mapped[int] = mapped_column(Integer, primary_key=True)
        tenant_id: Mapped[int] = mapped_column(Integer)
        user_sub: Mapped[str] = mapped_column(String, server_default="x")
        amount = mapped_column(Numeric(12, 2))

    for tenant in (1, 2):
        engine = create_engine(f"postgresql+psycopg://alice:{TOKENS[tenant]}@127.0.0.1:{PORT}/app")
        with Session(engine) as session:
            for _ in range(5):
                orders = session.scalars(select(Order)).all()
                check(orders and all(o.tenant_id == tenant for o in orders), f"tenant {tenant} saw foreign orders")
            session.add(Order(tenant_id=tenant, amount=8400 + tenant))
            session.commit()
            mine = session.scalars(select(Order).where(Order.amount == 8400 + tenant)).all()
            check(len(mine) == 1 and mine[0].tenant_id == tenant, "ORM insert not visible")
            session.delete(mine[0])
            session.commit()
            session.add(Order(tenant_id=3 - tenant, amount=1))
            try:
                session.commit()
                raise AssertionError("foreign insert succeeded")
            except AssertionError:
                raise
            except Exception as e:  # noqa: BLE001
                check("row-level security" in str(e), f"foreign insert: {e!r}")
                session.rollback()
        engine.dispose()


for name, fn in [("psycopg3 (prepare_threshold=0)", psycopg3), ("psycopg_pool", psycopg_pool),
                 ("asyncpg", asyncpg_client), ("SQLAlchemy 2 ORM", sqlalchemy_orm)]:
    run(name, fn)
for name, err in results:
    print(f"client {name}: {'pass' if err is None else 'FAIL ' + err}")
sys.exit(1 if any(err for _, err in results) else 0)
