# Sourced by bench/signed_instructions.sh and bench/signed_instructions_wire.sh: the checks they
# share and the throwaway cluster both count on (the RLS fixture, 200,000 orders over three
# tenants, and the "floor" function). Expects `here` (the repository), `pgtenant` (the binary),
# `bin` (the PostgreSQL 15 server binaries) and `dir` (an empty directory); defines `port`,
# `as_pg` and `psql_su`.

[ -x "$pgtenant" ] || { echo "build it first: cargo build --release -p pgtenant" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "valgrind is needed" >&2; exit 1; }
chmod 755 "$dir"
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$dir"
port=$((20000 + RANDOM % 20000))
psql_su() { psql -X -q -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres "$@"; }

# make_cluster LISTEN_ADDRESSES: initdb, start, the fixture and the orders
make_cluster() {
  as_pg "$bin/initdb -D $dir/data -U postgres -A trust >/dev/null"
  as_pg "$bin/pg_ctl -D $dir/data -o '-p $port -k $dir -c listen_addresses=$1' -l $dir/log -w start >/dev/null"
  psql_su -c 'CREATE DATABASE app'
  psql_su app -f "$here/tests/fixtures/rls.sql" >/dev/null
  psql_su app -c "INSERT INTO orders (tenant_id, user_sub, amount) SELECT 1 + g % 3, 'bench', g FROM generate_series(1, 200000) g" \
    -c 'VACUUM ANALYZE orders' >/dev/null
}

# install_functions CONFIG [plain]: `pgtenant install-sql` (unless `plain`), then the floor of any
# function-based policy: a SECURITY DEFINER PL/pgSQL function that only returns current_setting;
# then stops the cluster (each script starts it as it needs it)
install_functions() {
  [ "${2:-}" = plain ] || "$pgtenant" install-sql --config "$1" | psql_su app >/dev/null
  psql_su app <<'SQL' >/dev/null
CREATE SCHEMA bench_floor;
GRANT USAGE ON SCHEMA bench_floor TO app_user;
CREATE FUNCTION bench_floor.setting(name text) RETURNS text LANGUAGE plpgsql STABLE SECURITY DEFINER
  AS $$BEGIN RETURN pg_catalog.current_setting(name, true); END$$;
GRANT EXECUTE ON FUNCTION bench_floor.setting(text) TO app_user;
SQL
  as_pg "$bin/pg_ctl -D $dir/data -m fast -w stop >/dev/null"
}
