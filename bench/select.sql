-- "pgtenant" and "pgbouncer plain" rows: the bare lookup, one statement in autocommit.
-- Through pgtenant the tenant context comes from the client's JWT (pgtenant sends it in front of
-- the statement); through PgBouncer nothing sets it, so RLS returns no row (the lower bound of
-- pooler work, not a usable configuration).
\set id random(0, :maxk) * 100 + :tenant
SELECT id, tenant_id, val, note FROM bench WHERE id = :id;
