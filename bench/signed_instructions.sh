#!/usr/bin/env bash
# Instructions Postgres spends per one-query transaction on each policy style, counted with callgrind
# (docs/benchmarks.md, "Signed context"). Repeatable on a shared, noisy machine where TPS is not.
#
#   bench/signed_instructions.sh [PGTENANT_BINARY]     (default: target/release/pgtenant)
#
# It makes a throwaway cluster with the RLS fixture and 200,000 orders, installs the signed context
# with `pgtenant install-sql`, and runs a single-user backend (`postgres --single`) under callgrind:
# as a superuser it writes a verified-context record for one signature into
# session_preload_libraries (what pgtenant.verify() writes after a full check), then, as app_user,
# runs N transactions, each `BEGIN`, the settings pgtenant sets (tenant settings, context,
# signature), a primary-key read of orders, `COMMIT`. N = 200 and N = 1,200: the difference over
# 1,000 is the cost of one transaction, without the start-up. Printed per policy style, and above
# the plain `current_setting` policy:
#   plain      tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::integer
#   initplan   the same inside a sub-select (an InitPlan, no function)
#   floor      a sub-select calling a SECURITY DEFINER PL/pgSQL function that only returns
#              current_setting: the least any function-based policy costs
#   signed     (SELECT pgtenant.setting('app.tenant_id'))::integer, the remembered-context path
# Needs valgrind and the PostgreSQL 15 server binaries; when run as root, the server runs as the
# postgres user. Takes about two minutes.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
pgtenant=${1:-$here/target/release/pgtenant}
bin=${PG_BINDIR:-/usr/lib/postgresql/15/bin}
dir=$(mktemp -d /tmp/pgtenant-signed-instr.XXXXXX)
trap 'rm -rf "$dir"' EXIT
. "$here/bench/signed_cluster.sh"
make_cluster ''
cat > "$dir/pgtenant.toml" <<EOF
[backend]
url = "postgres://app_user:app-secret@127.0.0.1:$port/app"
[jwt]
secret = "signed-instructions-jwt-secret-0123456789"
[tenant]
settings = { "app.tenant_id" = "tenant_id", "app.user_id" = "sub" }
signing_key = "signed-instructions-key-0123456789abcdef"
EOF
install_functions "$dir/pgtenant.toml"

# the workload: the record holds 8 entries (a pool of 8 backends' worth), the session's in the middle
python3 - "$dir" <<'EOF'
import json, sys
d = sys.argv[1]
ctx = json.dumps({"bs": "1796184000.123456", "iat": 1796184000, "kid": "k1", "pid": 12345,
                  "settings": {"app.tenant_id": "1", "app.user_id": "bench"}}, separators=(",", ":"), sort_keys=True)
sig = "ab" * 32
sigs = ["%064x" % (i * 977 + 1) for i in range(7)]
sigs.insert(4, sig)
contexts = ["".join("\x01" + s + name + "\x04" + value + "\x03" for name, value in (("app.user_id", "bench"), ("app.tenant_id", "1")))
            for s in sigs]
record = "pgtenant:12345:1796184000.123456\x02" + "\x02".join(contexts) + "\x02."
def lit(s):
    return "E'" + "".join("\\x%02x" % ord(c) if ord(c) < 32 or c in "'\\" else c for c in s) + "'"
open(d + "/record.sql", "w").write("SELECT set_config('session_preload_libraries', %s, false);\n" % lit(record))
open(d + "/context.sql", "w").write(
    "SELECT set_config('app.tenant_id', '1', true), set_config('app.user_id', 'bench', true), "
    "set_config('pgtenant.context', %s, true), set_config('pgtenant.signature', '%s', true);\n" % (lit(ctx), sig))
EOF

count() { # count NAME POLICY N -> instructions
  local f="$dir/in-$1-$3.sql"
  {
    echo "ALTER POLICY tenant_isolation ON orders USING (tenant_id = $2);"
    cat "$dir/record.sql"
    echo "SET ROLE app_user;"
    for i in $(seq 1 "$3"); do
      echo "BEGIN;"; cat "$dir/context.sql"
      echo "SELECT id, tenant_id, amount FROM orders WHERE id = $(( (i * 7919) % 200000 + 1 ));"; echo "COMMIT;"
    done
  } > "$f"
  [ "$(id -u)" = 0 ] && chown postgres "$f"
  as_pg "valgrind --tool=callgrind --callgrind-out-file=$dir/cg.out $bin/postgres --single -D $dir/data -j app < $f > $dir/out.txt 2> $dir/err.txt"
  if ! grep -q 'tenant_id = "1"' "$dir/out.txt"; then echo "$1: the policy let no row through" >&2; exit 1; fi
  grep -o 'Collected : [0-9]*' "$dir/err.txt" | awk '{print $3}'
}

printf '| policy | instructions per transaction | above plain |\n|---|---:|---:|\n'
base=
while IFS='|' read -r name policy; do
  a=$(count "$name" "$policy" 200); b=$(count "$name" "$policy" 1200)
  per=$(( (b - a) / 1000 ))
  [ -z "$base" ] && base=$per
  printf '| %s | %d | %+d |\n' "$name" "$per" $(( per - base ))
done <<'EOF'
plain|NULLIF(current_setting('app.tenant_id', true), '')::integer
initplan|(SELECT NULLIF(current_setting('app.tenant_id', true), '')::integer)
floor|(SELECT bench_floor.setting('app.tenant_id'))::integer
signed|(SELECT pgtenant.setting('app.tenant_id'))::integer
EOF
