#!/usr/bin/env bash
# Checks the observability and deployment assets. Run from the repository root:
#
#   scripts/check-observability.sh
#
# Installs what is missing (Debian packages prometheus for promtool, docker-compose, nodejs/npm,
# python3; the npm packages of grafana/typecheck), then runs every check, prints one line per
# check and exits non-zero if any failed. Works as root on a fresh Debian 12 machine that can
# reach the Debian and npm registries. Needs no Docker daemon: `docker-compose config` only
# parses the file.
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ ! -f Cargo.toml || ! -d prometheus || ! -d grafana ]]; then
  echo "error: run from the payrecon repository" >&2
  exit 2
fi

# ------------------------------------------------------------------------------- installs
missing=()
command -v promtool >/dev/null || missing+=(prometheus)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import yaml' 2>/dev/null || missing+=(python3-yaml)
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "error: missing ${missing[*]} and not root: apt-get install ${missing[*]}" >&2
    exit 2
  fi
  echo "installing ${missing[*]} ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

TYPECHECK=grafana/typecheck
if [[ ! -x $TYPECHECK/node_modules/.bin/tsc ]]; then
  echo "installing the npm packages of $TYPECHECK ..."
  if [[ -f $TYPECHECK/package-lock.json ]]; then
    (cd "$TYPECHECK" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  else
    (cd "$TYPECHECK" && npm install --no-audit --no-fund --loglevel=error >/dev/null)
  fi
fi

# --------------------------------------------------------------------------------- checks
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0
failed=0

# check NAME COMMAND...: runs COMMAND, prints PASS/FAIL NAME; on failure also its output.
check() {
  local name=$1
  shift
  if "$@" >"$work/out" 2>&1; then
    printf 'PASS  %s\n' "$name"
    passed=$((passed + 1))
  else
    printf 'FAIL  %s\n' "$name"
    sed 's/^/      /' "$work/out"
    failed=$((failed + 1))
  fi
}

# Every payrecon_* name in the rules, their tests and the dashboards is one src/metrics.rs
# exports (histograms only through _bucket/_sum/_count).
metric_names() {
  python3 - <<'PY'
import glob, re, sys
src = open("src/metrics.rs").read()
consts = dict(re.findall(r'pub const (\w+): &str = "([^"]+)";', src))
histograms = {consts[c] for c in re.findall(r"describe_histogram!\(\s*(\w+)", src)}
known = {n for n in consts.values() if n not in histograms}
known |= {h + s for h in histograms for s in ("_bucket", "_sum", "_count")}
bad = []
for path in ["prometheus/alerts.yml", "prometheus/alerts.test.yml"] + sorted(glob.glob("grafana/dashboards/*.json")):
    for name in sorted(set(re.findall(r"\bpayrecon_[a-z0-9_]+", open(path).read()))):
        if name not in known:
            bad.append(f"{path}: {name} is not a metric of src/metrics.rs")
print("\n".join(bad) or f"{len(known)} exported names")
sys.exit(1 if bad else 0)
PY
}

# Every Prometheus expression of the dashboards parses (as a recording rule, with Grafana's
# variables replaced by representative values).
dashboard_promql() {
  python3 - "$work/dashboard-rules.yml" <<'PY' && promtool check rules "$work/dashboard-rules.yml"
import glob, json, sys, yaml
subst = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m",
         "$instance": ".*", "$topic": ".*"}
rules = []
for path in sorted(glob.glob("grafana/dashboards/*.json")):
    for panel in json.load(open(path))["panels"]:
        for t in panel.get("targets", []):
            if "expr" in t:
                expr = t["expr"]
                for k, v in subst.items():
                    expr = expr.replace(k, v)
                rules.append({"record": f"dashboard_check:{len(rules)}", "expr": expr})
yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}, open(sys.argv[1], "w"))
PY
}

# Files and directories docker-compose.yml mounts or builds from exist in the repository.
compose_files() {
  docker-compose -f docker-compose.yml config >"$work/compose.yml" && python3 - "$work/compose.yml" <<'PY'
import os, sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
missing = []
for name, svc in cfg["services"].items():
    build = svc.get("build")
    if build:
        ctx = build["context"] if isinstance(build, dict) else build
        paths = [ctx, os.path.join(ctx, build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")]
    else:
        paths = []
    for v in svc.get("volumes", []):
        src = v.get("source") if isinstance(v, dict) else v.split(":")[0]
        if src and src.startswith("/"):
            paths.append(src)
    missing += [f"{name}: {p}" for p in paths if not os.path.exists(p)]
print("\n".join(missing) or "all referenced files exist")
sys.exit(1 if missing else 0)
PY
}

# The provisioning files parse, and every datasource uid a dashboard uses is provisioned.
grafana_provisioning() {
  python3 - <<'PY'
import glob, json, sys, yaml
ds = yaml.safe_load(open("grafana/provisioning/datasources/datasources.yml"))["datasources"]
provisioned = {d["uid"]: d["type"] for d in ds}
providers = yaml.safe_load(open("grafana/provisioning/dashboards/dashboards.yml"))["providers"]
assert any(p["options"]["path"] == "/var/lib/grafana/dashboards" for p in providers), "no provider for /var/lib/grafana/dashboards"
bad, uids = [], set()
def refs(node):
    if isinstance(node, dict):
        d = node.get("datasource")
        if isinstance(d, dict) and d.get("uid") and d.get("type") != "grafana":
            yield d
        for v in node.values():
            yield from refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from refs(v)
for path in sorted(glob.glob("grafana/dashboards/*.json")):
    dash = json.load(open(path))
    if dash["uid"] in uids:
        bad.append(f"{path}: duplicate dashboard uid {dash['uid']}")
    uids.add(dash["uid"])
    for d in refs(dash):
        if provisioned.get(d["uid"]) != d.get("type"):
            bad.append(f"{path}: datasource {d} is not provisioned")
print("\n".join(sorted(set(bad))) or f"datasources {sorted(provisioned)}; dashboards {sorted(uids)}")
sys.exit(1 if bad else 0)
PY
}

check "promtool check config prometheus/prometheus.yml" promtool check config prometheus/prometheus.yml
check "promtool check rules prometheus/alerts.yml" promtool check rules prometheus/alerts.yml
check "promtool test rules prometheus/alerts.test.yml" promtool test rules prometheus/alerts.test.yml
check "metric names match src/metrics.rs" metric_names
check "dashboard PromQL parses" dashboard_promql
check "grafana provisioning matches the dashboards" grafana_provisioning
check "grafana/typecheck/generated up to date" node "$TYPECHECK/generate.mjs" --check
check "tsc --noEmit -p grafana/typecheck" "$TYPECHECK/node_modules/.bin/tsc" --noEmit -p "$TYPECHECK"
check "docker-compose -f docker-compose.yml config -q" docker-compose -f docker-compose.yml config -q
check "docker-compose references exist" compose_files
check "bash -n grafana/postgres-init/*.sh" bash -c 'for f in grafana/postgres-init/*.sh; do bash -n "$f" || exit 1; done'

echo "observability: $passed passed, $failed failed"
((failed == 0))
