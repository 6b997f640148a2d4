-- "pgbouncer+set_config" and "direct (64 connections)" rows: the context in its own statement of
-- an explicit transaction: BEGIN, set the context, look one row up, commit. Four round trips per
-- transaction (the weaker baseline the first benchmark compared against).
-- :tenant and :maxk come from pgbench -D; bench.tenant_id = 1 + (id - 1) % 100, so the id below
-- always belongs to :tenant and the lookup returns exactly one row (a primary-key index scan).
\set id random(0, :maxk) * 100 + :tenant
BEGIN;
SELECT set_config('app.tenant_id', CAST(:tenant AS text), true), set_config('app.user_id', 'bench', true);
SELECT id, tenant_id, val, note FROM bench WHERE id = :id;
END;
