-- Write mix in prepared mode: "pgtenant" and "direct (8 connections)" (context as startup options).
-- The same four statements as write.sql, sent as one pipeline (Bind/Execute x 4, one Sync): one round
-- trip, like the one-Query form that PgBouncer's simple-protocol row (the comparison for -M prepared)
-- sends. Also avoids a stall of pgbench -M prepared through any transaction pooler (bench/README.md,
-- "write mix").
\set uid random(0, :wmaxk) * 100 + :tenant
\set val random(1, 1000000)
\startpipeline
BEGIN;
INSERT INTO bench_write (val, note) VALUES (:val, 'bench') RETURNING id, tenant_id;
UPDATE bench_write SET val = val + 1 WHERE id = :uid RETURNING id, val;
END;
\endpipeline
