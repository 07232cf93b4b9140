#!/usr/bin/env bash
# The README's test command. Installs and starts everything the tests need on a fresh
# Debian 12 machine (as root), then runs the checks and the whole test suite:
#   - PostgreSQL on 127.0.0.1:5432 (started if it is installed but down), and the PostgreSQL 15
#     server binaries (initdb, pg_ctl, pg_basebackup) for the failover drills' own clusters
#   - C build dependencies of librdkafka (gcc, make, pkg-config, libssl-dev, zlib1g-dev)
#   - tansu, a separate Kafka-compatible broker process (cargo install, cached in ~/.cargo/bin)
#   - promtool, docker-compose, npm packages for the observability checks
#   - kubectl (kustomize) and the kubernetes-validate package for the manifest checks
# Every test creates its own database and topics and cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s ==\n' "$*"; }

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

step "system packages"
need=()
for pkg in gcc g++ make pkg-config libssl-dev zlib1g-dev postgresql-client; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  as_root apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
echo "ok"

step "PostgreSQL"
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  if ! command -v pg_ctlcluster >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq
    as_root apt-get install -y -qq postgresql
  fi
  version=$(ls /etc/postgresql | sort -V | tail -1)
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
pg_isready -h 127.0.0.1 -p 5432
# The failover drills (tests/it/failover.rs) create their own throwaway clusters with these.
if [[ ! -x /usr/lib/postgresql/15/bin/initdb ]]; then
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  as_root apt-get install -y -qq --no-install-recommends postgresql-15
fi

step "tansu broker (a real, separate Kafka-compatible process)"
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v tansu >/dev/null; then
  echo "installing tansu (cargo install, ~15 min on 2 cores; cached afterwards) ..."
  cargo install tansu --locked --features libsql --quiet
fi
tansu --version || true

step "observability assets"
bash scripts/check-observability.sh

step "Kubernetes manifests"
bash scripts/check-deploy.sh

step "format and lints"
cargo fmt --check
cargo clippy --release --all-targets --quiet -- -D warnings

step "tests"
cargo test --release
