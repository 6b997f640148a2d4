-- Cost of the signed-context verifying function (docs/benchmarks.md, "Signed context").
-- Run as the restricted role on a database prepared with `pgtenant install-sql` (schema pgtenant,
-- pgcrypto reachable through the search_path), with the signing key of kid k1 in psql's `key`:
--   psql "postgres://app_user:…@host/app" -X -q -v key="$SIGNING_KEY" -f bench/signed_context.sql
-- It signs a context for its own backend exactly as pgtenant does (set at session level, so that it
-- holds across the transactions below) and times, three times each, 3,000 runs of the form
-- policies use, `SELECT (SELECT f)`, through EXECUTE (parsed and planned like a client query):
-- - each in its own transaction (COMMIT after each): what one query of a pgtenant transaction pays;
-- - all in one transaction: what later queries of a transaction pay;
-- and the function called for 3,000 rows of one query (per call, no parsing). Prints microseconds;
-- the difference to current_setting() is what a signed policy adds. pgtenant.setting() answers from
-- what the backend remembers of contexts it verified; pgtenant.verify() is the full check it falls
-- back on, which a context pays the first time it reaches a backend (plus, once per backend
-- connection, a look at pg_stat_activity that is not timed here). Comparable on one machine only.

SELECT set_config('pgtenant.context',
         format('{"bs":"%s","iat":1,"kid":"k1","pid":%s,"settings":{"app.tenant_id":"2","app.user_id":"u","request.jwt.claims":"{\"sub\":\"u\",\"tenant_id\":2}"}}',
                (SELECT extract(epoch from backend_start)::text FROM pg_catalog.pg_stat_get_activity(pg_catalog.pg_backend_pid())),
                pg_backend_pid()),
         false) IS NOT NULL AS context_set;
SELECT set_config('pgtenant.signature',
         encode(hmac(convert_to(current_setting('pgtenant.context'), 'UTF8'), convert_to(:'key', 'UTF8'), 'sha256'), 'hex'),
         false) IS NOT NULL AS signature_set;
SELECT set_config('app.tenant_id', '2', false) IS NOT NULL AS plain_set;
-- must print 2: the context verifies (else the figures below time the rejection path)
SELECT pgtenant.setting('app.tenant_id') AS verified_tenant;

CREATE TEMP TABLE signed_context_timings (what text, run int, us numeric);
DO $$
DECLARE
  n constant int := 3000;
  t0 timestamptz;
  v text;
  q text;
BEGIN
  FOR run IN 1..3 LOOP
    FOREACH q IN ARRAY ARRAY[
      'SELECT (SELECT current_setting(''app.tenant_id'', true))',
      'SELECT (SELECT pgtenant.setting(''app.tenant_id''))',
      'SELECT (SELECT pgtenant.verify(''app.tenant_id''))',
      'SELECT (SELECT pgtenant.claims() ->> ''sub'')'] LOOP
      t0 := clock_timestamp();
      FOR i IN 1..n LOOP
        EXECUTE q INTO v;
        COMMIT;
      END LOOP;
      INSERT INTO signed_context_timings VALUES ('query, own transaction: ' || q, run, extract(epoch FROM clock_timestamp() - t0) * 1e6 / n);
      t0 := clock_timestamp();
      FOR i IN 1..n LOOP
        EXECUTE q INTO v;
      END LOOP;
      INSERT INTO signed_context_timings VALUES ('query, one transaction: ' || q, run, extract(epoch FROM clock_timestamp() - t0) * 1e6 / n);
      COMMIT;
    END LOOP;
    t0 := clock_timestamp();
    SELECT count(x) INTO v FROM (SELECT pgtenant.setting('app.tenant_id') x FROM generate_series(1, n)) s;
    INSERT INTO signed_context_timings VALUES ('call: pgtenant.setting(''app.tenant_id'')', run, extract(epoch FROM clock_timestamp() - t0) * 1e6 / n);
    t0 := clock_timestamp();
    SELECT count(x) INTO v FROM (SELECT current_setting('app.tenant_id', true) x FROM generate_series(1, n)) s;
    INSERT INTO signed_context_timings VALUES ('call: current_setting(''app.tenant_id'', true)', run, extract(epoch FROM clock_timestamp() - t0) * 1e6 / n);
    COMMIT;
  END LOOP;
END
$$;
SELECT what, string_agg(round(us, 1)::text, ' / ' ORDER BY run) AS "us, runs 1-3", round(min(us), 1) AS "us, best"
  FROM signed_context_timings GROUP BY what ORDER BY 1;
