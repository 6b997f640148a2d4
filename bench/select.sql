-- The bare lookup, one statement in autocommit. Used by:
--   "pgtenant": the tenant context comes from the client's JWT (pgtenant sends it in front of the
--     statement, in the same write);
--   "pgbouncer connect_query": through PgBouncer's per-tenant database, whose server connections
--     ran connect_query (session-level set_config) when they were opened;
--   "direct (8 connections)" in extended/prepared mode: the context is a startup option
--     (PGOPTIONS="-c app.tenant_id=… -c app.user_id=bench");
--   "pgbouncer plain" (--extra-rows): nothing sets the context, so RLS returns no row (the lower
--     bound of pooler work, not a usable configuration).
\set id random(0, :maxk) * 100 + :tenant
SELECT id, tenant_id, val, note FROM bench WHERE id = :id;
