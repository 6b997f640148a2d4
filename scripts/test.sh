#!/usr/bin/env bash
# Runs every test: unit tests, the integration suite and the real-client suite against a throwaway
# Postgres cluster, the isolation suite, a 30 s soak, and a short fuzzing run of every target. Installs what is missing: Postgres server binaries,
# pgbench, openssl, Java + pgjdbc (apt-get), promtool (from Debian's prometheus package), the Python
# drivers (venv) and the Node drivers (npm ci).
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkg=()
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  need_pkg+=(postgresql)
fi
command -v psql >/dev/null 2>&1 || need_pkg+=(postgresql-client)
command -v pgbench >/dev/null 2>&1 || need_pkg+=(postgresql-contrib)
command -v openssl >/dev/null 2>&1 || need_pkg+=(openssl)
command -v java >/dev/null 2>&1 || need_pkg+=(default-jre-headless)
[ -f /usr/share/java/postgresql.jar ] || need_pkg+=(libpostgresql-jdbc-java)
# libclang for bindgen, which builds the pg_query crate of the lexer_diff fuzz target
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || need_pkg+=(libclang-dev)
if [ ${#need_pkg[@]} -gt 0 ]; then
  echo "installing: ${need_pkg[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkg[@]}" >/dev/null
fi

# promtool checks and unit-tests deploy/prometheus/alerts.yaml (tests/deploy/validate.py). Only the
# binary is taken from Debian's prometheus package: installing the package would start a server.
if ! command -v promtool >/dev/null 2>&1 && [ ! -x tests/deploy/.promtool/promtool ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  deb=$(mktemp -d)
  if (cd "$deb" && { apt-get download prometheus >/dev/null 2>&1 || { $SUDO apt-get update -qq && apt-get download prometheus >/dev/null 2>&1; }; } \
      && dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/promtool); then
    mkdir -p tests/deploy/.promtool && mv "$deb/usr/bin/promtool" tests/deploy/.promtool/promtool
  else
    echo "promtool not available: alert rules get a structural check only"
  fi
  rm -rf "$deb"
fi

# Real-client suite: Python drivers in a project-local virtualenv.
venv=tests/clients/.venv
if [ ! -x "$venv/bin/python" ] || ! cmp -s tests/clients/requirements.txt "$venv/requirements.installed"; then
  echo "installing the Python client suite into $venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check -r tests/clients/requirements.txt
  cp tests/clients/requirements.txt "$venv/requirements.installed"
fi

# Real-client suite: Node drivers from the lockfile.
if ! command -v npm >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi
if ! cmp -s tests/clients/package-lock.json tests/clients/node_modules/.package-lock.installed; then
  echo "installing the Node client suite into tests/clients/node_modules"
  (cd tests/clients && npm ci --no-audit --no-fund --loglevel=error)
  cp tests/clients/package-lock.json tests/clients/node_modules/.package-lock.installed
fi

cargo test --workspace --locked

# Short fuzzing run of every target (the long runs are documented in docs/reliability.md).
scripts/fuzz.sh "${PGTENANT_FUZZ_SECS:-20}"
