-- "pgbouncer same-query" row (simple protocol) and "direct (8 connections)" in simple mode: the
-- application sets its context in the SAME simple Query as its statement. `\;` makes pgbench send
-- both statements as one Query message: one round trip, one implicit transaction, so the
-- set_config(…, true) values hold for the lookup and are gone afterwards.
-- :tenant and :maxk come from pgbench -D; bench.tenant_id = 1 + (id - 1) % 100, so the id below
-- always belongs to :tenant and the lookup returns exactly one row (a primary-key index scan).
\set id random(0, :maxk) * 100 + :tenant
SELECT set_config('app.tenant_id', CAST(:tenant AS text), true), set_config('app.user_id', 'bench', true) \;
SELECT id, tenant_id, val, note FROM bench WHERE id = :id;
