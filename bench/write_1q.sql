-- Write mix, "pgtenant" row in simple mode: the same one-Query transaction as write_same.sql
-- without the set_config (pgtenant puts the context in front of it). One round trip.
\set uid random(0, :wmaxk) * 100 + :tenant
\set val random(1, 1000000)
BEGIN \;
INSERT INTO bench_write (val, note) VALUES (:val, 'bench') RETURNING id, tenant_id \;
UPDATE bench_write SET val = val + 1 WHERE id = :uid RETURNING id, val \;
COMMIT;
