-- Login-rate runs (pgbench -C: a new connection for every transaction).
SELECT 1;
