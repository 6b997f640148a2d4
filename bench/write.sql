-- Write mix in extended mode: "pgtenant" (context from the JWT), "pgbouncer
-- connect_query" (the tenant database's server connections carry the context from connect_query)
-- and "direct (8 connections)" (context as startup options). Four statements, four round trips for
-- every row. The INSERT takes its id from a nextval default and its tenant_id from the context; the
-- UPDATE hits one of the tenant's preloaded rows.
\set uid random(0, :wmaxk) * 100 + :tenant
\set val random(1, 1000000)
BEGIN;
INSERT INTO bench_write (val, note) VALUES (:val, 'bench') RETURNING id, tenant_id;
UPDATE bench_write SET val = val + 1 WHERE id = :uid RETURNING id, val;
END;
