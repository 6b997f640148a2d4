-- "direct" and "pgbouncer+set_config" rows: what an application does itself when no proxy
-- sets the tenant context. One explicit transaction: set the context, look one row up, commit.
-- :tenant and :maxk come from pgbench -D; bench.tenant_id = 1 + (id - 1) % 100, so the id below
-- always belongs to :tenant and the lookup returns exactly one row (a primary-key index scan).
\set id random(0, :maxk) * 100 + :tenant
BEGIN;
SELECT set_config('app.tenant_id', CAST(:tenant AS text), true), set_config('app.user_id', 'bench', true);
SELECT id, tenant_id, val, note FROM bench WHERE id = :id;
END;
