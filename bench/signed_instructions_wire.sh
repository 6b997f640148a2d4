#!/usr/bin/env bash
# Instructions a Postgres backend spends per one-query transaction through pgtenant, per pgbench
# protocol mode and policy style, counted with callgrind (docs/benchmarks.md, "Signed context").
# bench/signed_instructions.sh counts the same in a single-user backend, which speaks no protocol;
# this one runs the real server under callgrind behind pgtenant, so what each mode costs (parsing
# and planning every query in simple and extended mode, a cached plan in prepared mode) is counted
# too, and the ratios are those a CPU-bound server would show in TPS.
#
#   bench/signed_instructions_wire.sh [PGTENANT_BINARY]     (default: target/release/pgtenant)
#   bench/signed_instructions_wire.sh --context [PGTENANT_BINARY]
#
# With --context it measures what pgtenant's context statement costs the server instead (issue
# 17): pgtenant set up as bench/run.py sets it up (two tenant settings, no claims object, no
# signing), the plain policy, against pgbench connected straight to the server with the same two
# settings made once per connection (PGOPTIONS, as PgBouncer's connect_query makes them).
#
# A throwaway cluster with the RLS fixture and 200,000 orders, `pgtenant install-sql`, and the
# floor function of signed_instructions.sh; the postmaster runs under callgrind (its backends are
# forked, so each writes its own count when it exits), pgtenant in front of it with a pool of one.
# Per mode and policy, two fresh backends run 20 + 100 and 20 + 1,100 pgbench transactions (a
# primary-key read of orders); the difference over 1,000 is one transaction, without the backend's
# start, pgtenant's context statement preparation and the first full check of the signed context
# (a backend's start varies by a few million instructions from one to the next: over 1,000
# transactions that is a few thousand per transaction).
# Needs valgrind, pgbench and the PostgreSQL 15 server binaries; when run as root, the server runs
# as the postgres user. Takes about eight minutes.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
context=
[ "${1:-}" = --context ] && { context=1; shift; }
pgtenant=${1:-$here/target/release/pgtenant}
bin=${PG_BINDIR:-/usr/lib/postgresql/15/bin}
dir=$(mktemp -d /tmp/pgtenant-signed-wire.XXXXXX)
. "$here/bench/signed_cluster.sh"
proxy_port=$((port + 1))
proxy_pid=
cleanup() {
  [ -n "$proxy_pid" ] && kill "$proxy_pid" 2>/dev/null || true
  [ -f "$dir/data/postmaster.pid" ] && as_pg "kill -INT \$(head -1 $dir/data/postmaster.pid)" 2>/dev/null || true
  sleep 3
  rm -rf "$dir"
}
trap cleanup EXIT

make_cluster 127.0.0.1
if [ -n "$context" ]; then tenant_extra='claims_setting = ""'
else tenant_extra='signing_key = "signed-instructions-key-0123456789abcdef"'; fi
cat > "$dir/pgtenant.toml" <<EOF
[server]
listen = "127.0.0.1:$proxy_port"
worker_threads = 1
[backend]
url = "postgres://app_user:app-secret@127.0.0.1:$port/app"
pool_size = 1
[jwt]
secret = "signed-instructions-jwt-secret-0123456789"
[tenant]
settings = { "app.tenant_id" = "tenant_id", "app.user_id" = "sub" }
$tenant_extra
[log]
level = "warn"
EOF
install_functions "$dir/pgtenant.toml" ${context:+plain}

# the server under callgrind: every backend writes cg.<pid> when it exits
mkdir "$dir/cg" && { [ "$(id -u)" = 0 ] && chown postgres "$dir/cg" || true; }
as_pg "nohup valgrind --tool=callgrind --callgrind-out-file=$dir/cg/cg.%p $bin/postgres -D $dir/data -p $port -k $dir -c listen_addresses=127.0.0.1 > $dir/valgrind.log 2>&1 &"
for _ in $(seq 1 120); do psql_su -c 'SELECT 1' >/dev/null 2>&1 && break; sleep 1; done
"$pgtenant" run --config "$dir/pgtenant.toml" > "$dir/pgtenant.log" 2>&1 &
proxy_pid=$!
token=$("$pgtenant" token --secret signed-instructions-jwt-secret-0123456789 --claim tenant_id=1 --sub bench --ttl 3h)
printf '\\set id random(1, 200000)\nSELECT id, tenant_id, amount FROM orders WHERE id = :id;\n' > "$dir/read.sql"
# as pgbench: pgtenant's pooled connection logs in with the name of the client that opened it
client() { PGAPPNAME=pgbench PGPASSWORD=$token "$@" -h 127.0.0.1 -p "$proxy_port" -U bench app; }
sleep 2

count() { # count POLICY MODE N -> instructions of one fresh backend that ran 20 + N transactions
  for _ in $(seq 1 100); do [ -z "$(psql_su -At -c "SELECT 1 FROM pg_stat_activity WHERE application_name = 'pgbench_direct'")" ] && break; sleep 0.3; done
  psql_su app -c "ALTER POLICY tenant_isolation ON orders USING (tenant_id = $1)" \
    -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app_user'" >/dev/null
  sleep 3
  # the pool notices its backend is gone on the next use: these two open a new one
  client psql -X -q -c 'SELECT 1' >/dev/null 2>&1 || true
  client psql -X -q -c 'SELECT 1' >/dev/null 2>&1
  local pid
  pid=$(psql_su -At -c "SELECT pid FROM pg_stat_activity WHERE usename = 'app_user' ORDER BY backend_start DESC LIMIT 1")
  client "$bin/pgbench" -n -c 1 -t $((20 + $3)) -M "$2" -f "$dir/read.sql" > "$dir/pgbench.txt" 2>&1 \
    || { cat "$dir/pgbench.txt" >&2; exit 1; }
  if ! grep -q 'number of failed transactions: 0' "$dir/pgbench.txt"; then cat "$dir/pgbench.txt" >&2; exit 1; fi
  psql_su -c "SELECT pg_terminate_backend($pid)" >/dev/null
  for _ in $(seq 1 60); do [ -s "$dir/cg/cg.$pid" ] && grep -q '^totals:' "$dir/cg/cg.$pid" && break; sleep 1; done
  awk '/^totals:/ {print $2; exit}' "$dir/cg/cg.$pid"
}

count_direct() { # count_direct POLICY MODE N -> instructions of the backend of pgbench connected straight
  psql_su app -c "ALTER POLICY tenant_isolation ON orders USING (tenant_id = $1)" >/dev/null
  for _ in $(seq 1 100); do [ -z "$(psql_su -At -c "SELECT 1 FROM pg_stat_activity WHERE application_name = 'pgbench_direct'")" ] && break; sleep 0.3; done
  PGAPPNAME=pgbench_direct PGOPTIONS="-c app.tenant_id=1 -c app.user_id=bench" PGPASSWORD=app-secret "$bin/pgbench" -n -h 127.0.0.1 -p "$port" \
    -U app_user -c 1 -t $((20 + $3)) -M "$2" -f "$dir/read.sql" app > "$dir/pgbench.txt" 2>&1 &
  local bg=$! pid=
  for _ in $(seq 1 100); do
    pid=$(psql_su -At -c "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgbench_direct'"); [ -n "$pid" ] && break; sleep 0.2
  done
  wait $bg || { cat "$dir/pgbench.txt" >&2; exit 1; }
  if ! grep -q 'number of failed transactions: 0' "$dir/pgbench.txt"; then cat "$dir/pgbench.txt" >&2; exit 1; fi
  for _ in $(seq 1 60); do [ -s "$dir/cg/cg.$pid" ] && grep -q '^totals:' "$dir/cg/cg.$pid" && break; sleep 1; done
  awk '/^totals:/ {print $2; exit}' "$dir/cg/cg.$pid"
}

# a sanity check: through pgtenant, each policy lets the session's own tenant through
client psql -X -At -c 'SELECT count(*) > 0 AND bool_and(tenant_id = 1) FROM orders' | grep -qx t \
  || { echo "pgtenant: tenant 1 does not see its rows" >&2; exit 1; }

plain="NULLIF(current_setting('app.tenant_id', true), '')::integer"
if [ -n "$context" ]; then
  printf '| mode | direct, settings made once per connection | through pgtenant | the context statement |\n|---|---:|---:|---:|\n'
  for mode in simple extended prepared; do
    a=$(count_direct "$plain" "$mode" 100); b=$(count_direct "$plain" "$mode" 1100); direct=$(( (b - a) / 1000 ))
    a=$(count "$plain" "$mode" 100); b=$(count "$plain" "$mode" 1100); proxied=$(( (b - a) / 1000 ))
    printf '| %s | %d | %d | %+d |\n' "$mode" "$direct" "$proxied" $(( proxied - direct ))
  done
  exit 0
fi
printf '| mode | policy | instructions per transaction | above plain | plain / policy |\n|---|---|---:|---:|---:|\n'
for mode in simple extended prepared; do
  base=
  while IFS='|' read -r name policy; do
    a=$(count "$policy" "$mode" 100); b=$(count "$policy" "$mode" 1100)
    per=$(( (b - a) / 1000 ))
    [ -z "$base" ] && base=$per
    printf '| %s | %s | %d | %+d | %.3f |\n' "$mode" "$name" "$per" $(( per - base )) "$(echo "$base / $per" | bc -l)"
  done <<'EOF'
plain|NULLIF(current_setting('app.tenant_id', true), '')::integer
floor|(SELECT bench_floor.setting('app.tenant_id'))::integer
signed|(SELECT pgtenant.setting('app.tenant_id'))::integer
EOF
done
