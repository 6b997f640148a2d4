-- Write mix, "pgbouncer same-query" row (simple protocol) and "direct (8 connections)" in simple
-- mode: one explicit transaction sent as ONE simple Query (`\;` joins the statements): set the
-- context, insert a row (id from a nextval default, tenant_id from the context) and update one of
-- the tenant's preloaded rows, both with RETURNING. One round trip.
-- bench_write.tenant_id = 1 + (id - 1) % 100 for the preloaded ids 1 .. :wmaxk * 100 + 100.
\set uid random(0, :wmaxk) * 100 + :tenant
\set val random(1, 1000000)
BEGIN \;
SELECT set_config('app.tenant_id', CAST(:tenant AS text), true), set_config('app.user_id', 'bench', true) \;
INSERT INTO bench_write (val, note) VALUES (:val, 'bench') RETURNING id, tenant_id \;
UPDATE bench_write SET val = val + 1 WHERE id = :uid RETURNING id, val \;
COMMIT;
