#!/usr/bin/env bash
# End-to-end test of the Kubernetes deployment on a throwaway kind cluster (a workstation with Docker
# and network access; the project's CI machines can neither pull kind's node image nor run an API
# server, so there tests/kind skips):
#
#   kind cluster -> project image loaded -> KubeRay operator + Kubeflow Pipelines -> the lmforge chart
#   (exactly the manifests tests/deploy/test_chart.py validates: charts/lmforge/ci/kind-values.yaml
#   rendered by scripts/render_chart.py) -> upload and run the pipeline -> promote the model ->
#   the RayService serves it -> OpenAI requests -> pytest -m kind tests/kind checks every step.
#
#   scripts/kind_e2e.sh                     # everything, then deletes the cluster
#   KEEP_CLUSTER=1 scripts/kind_e2e.sh      # leave it running (kubectl --context kind-lmforge-e2e ...)
#   SKIP_BUILD=1 IMAGE=lmforge:kind ...     # use an image you built already
#
# Needs: docker, kind (>= 0.24), kubectl (>= 1.30), the project's .venv (make install), ~12 GB RAM for
# Docker. Versions it installs: see the variables below (the README's "Running on Kubernetes").
set -euo pipefail

CLUSTER=${CLUSTER:-lmforge-e2e}
NAMESPACE=${NAMESPACE:-kubeflow}      # standalone KFP runs its task pods here: they share the ConfigMap/Secrets
RELEASE=${RELEASE:-lmforge}
IMAGE=${IMAGE:-lmforge:kind}          # charts/lmforge/ci/kind-values.yaml: image lmforge:kind, pullPolicy Never
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-kindest/node:v1.30.13}
KUBERAY_VERSION=${KUBERAY_VERSION:-1.7.0}
KFP_VERSION=${KFP_VERSION:-2.5.0}
MODEL_NAME=${MODEL_NAME:-kind-demo}   # = serving.model in kind-values.yaml (models:/kind-demo@champion)
RUN_CONFIG=${RUN_CONFIG:-configs/demo.yaml}
KFP_PORT=${KFP_PORT:-18888}
MLFLOW_PORT=${MLFLOW_PORT:-15000}
SERVE_PORT=${SERVE_PORT:-18000}
WORKDIR=${WORKDIR:-$(mktemp -d -t lmforge-kind.XXXXXX)}

REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO_ROOT"
PY=${PYTHON:-$REPO_ROOT/.venv/bin/python}
LMFORGE=${LMFORGE:-$REPO_ROOT/.venv/bin/lmforge}
CONTEXT=kind-$CLUSTER
KUBECTL=(kubectl --context "$CONTEXT")
PIDS=()

step() { printf '\n==> %s\n' "$*"; }
die() { echo "kind_e2e: $*" >&2; exit 1; }
for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || die "$tool is not installed (needs docker, kind, kubectl)"
done
[ -x "$PY" ] || die "no Python at $PY: run 'make install' first (or set PYTHON=)"

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [ "${KEEP_CLUSTER:-0}" != 1 ]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

port_forward() {  # port_forward TARGET LOCAL:REMOTE -- in the background, until the script exits
  "${KUBECTL[@]}" -n "$NAMESPACE" port-forward "$1" "$2" >"$WORKDIR/port-forward-${2%%:*}.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 60); do
    curl -s -o /dev/null "http://127.0.0.1:${2%%:*}/" && return 0
    sleep 1
  done
  die "port-forward $1 $2 did not come up (see $WORKDIR/port-forward-${2%%:*}.log)"
}

step "1/9 kind cluster $CLUSTER ($KIND_NODE_IMAGE); work dir $WORKDIR"
if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --image "$KIND_NODE_IMAGE" --wait 120s
fi

step "2/9 project image $IMAGE -> the cluster's nodes"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  # EXTRAS=server: the MLflow server of the chart runs this image (psycopg2 for Postgres, boto3 for S3)
  DOCKER_BUILDKIT=1 docker build --build-arg EXTRAS=server -t "$IMAGE" .
fi
kind load docker-image "$IMAGE" --name "$CLUSTER"

step "3/9 KubeRay operator v$KUBERAY_VERSION"
"${KUBECTL[@]}" apply --server-side -k "github.com/ray-project/kuberay/ray-operator/config/default?ref=v$KUBERAY_VERSION"
"${KUBECTL[@]}" -n ray-system wait --for=condition=Available deployment/kuberay-operator --timeout=300s 2>/dev/null \
  || "${KUBECTL[@]}" wait --for=condition=Available deployment -l app.kubernetes.io/name=kuberay-operator -A --timeout=300s

step "4/9 Kubeflow Pipelines $KFP_VERSION (standalone, platform-agnostic)"
"${KUBECTL[@]}" apply -k "github.com/kubeflow/pipelines/manifests/kustomize/cluster-scoped-resources?ref=$KFP_VERSION"
"${KUBECTL[@]}" wait --for=condition=established crd/applications.app.k8s.io --timeout=120s
"${KUBECTL[@]}" apply -k "github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=$KFP_VERSION"
"${KUBECTL[@]}" -n kubeflow wait --for=condition=Available deployment --all --timeout=1200s

step "5/9 Secrets (random values, never in the chart's values)"
"${KUBECTL[@]}" create namespace "$NAMESPACE" --dry-run=client -o yaml | "${KUBECTL[@]}" apply -f -
rand() { "$PY" -c 'import secrets; print(secrets.token_hex(16))'; }
API_KEY=$(rand)
printf '%s\n' "$API_KEY" >"$WORKDIR/api-key"
secret() { "${KUBECTL[@]}" -n "$NAMESPACE" create secret generic "$@" --dry-run=client -o yaml | "${KUBECTL[@]}" apply -f -; }
secret lmforge-s3 --from-literal=AWS_ACCESS_KEY_ID=lmforge --from-literal=AWS_SECRET_ACCESS_KEY="$(rand)"
secret lmforge-postgres --from-literal=POSTGRES_PASSWORD="$(rand)"
secret lmforge-api-keys --from-literal=keys="$API_KEY"

step "6/9 the chart: the manifests the chart tests validate (platform first, the RayService after promotion)"
render=("$PY" scripts/render_chart.py -f charts/lmforge/ci/kind-values.yaml --name "$RELEASE" --namespace "$NAMESPACE")
"${render[@]}" -o "$WORKDIR/manifests.yaml"
"${render[@]}" --skip-kind RayService -o "$WORKDIR/platform.yaml"
"${render[@]}" --only-kind RayService -o "$WORKDIR/serving.yaml"
"${KUBECTL[@]}" apply --server-side -f "$WORKDIR/platform.yaml"
"${KUBECTL[@]}" -n "$NAMESPACE" rollout status "statefulset/$RELEASE-postgres" --timeout=600s
"${KUBECTL[@]}" -n "$NAMESPACE" rollout status "deployment/$RELEASE-minio" --timeout=600s
"${KUBECTL[@]}" -n "$NAMESPACE" rollout status "deployment/$RELEASE-mlflow" --timeout=600s
"${KUBECTL[@]}" -n "$NAMESPACE" wait --for=jsonpath='{.status.state}'=ready "raycluster/$RELEASE-train" --timeout=900s

step "7/9 upload and run the pipeline"
port_forward svc/ml-pipeline "$KFP_PORT:8888"
port_forward "svc/$RELEASE-mlflow" "$MLFLOW_PORT:5000"
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
# every task gets the chart's service addresses (<release>-env) and the S3 credentials (lmforge-s3)
CLUSTER_ENV=(--env-configmap "$RELEASE-env" --s3-secret lmforge-s3)
"$LMFORGE" pipeline upload --host "http://127.0.0.1:$KFP_PORT" --image "$IMAGE" --gpus 0 "${CLUSTER_ENV[@]}"
"$LMFORGE" pipeline submit --host "http://127.0.0.1:$KFP_PORT" --image "$IMAGE" --gpus 0 "${CLUSTER_ENV[@]}" \
  --experiment kind-e2e --run-name kind-e2e --config "$RUN_CONFIG" --set "register.model_name=$MODEL_NAME" \
  | tee "$WORKDIR/submit.log"
"$PY" - "$KFP_PORT" "$WORKDIR" <<'EOF'
import json, sys
import kfp
client = kfp.Client(host=f"http://127.0.0.1:{sys.argv[1]}")
exp = client.get_experiment(experiment_name="kind-e2e")
runs = client.list_runs(experiment_id=exp.experiment_id, sort_by="created_at desc", page_size=1).runs
run = client.wait_for_run_completion(runs[0].run_id, timeout=3600)
print("pipeline run", run.run_id, run.state)
json.dump({"run_id": run.run_id, "state": str(run.state)}, open(f"{sys.argv[2]}/run.json", "w"))
sys.exit(0 if run.state == "SUCCEEDED" else 1)
EOF

step "8/9 promote the new version to champion; the RayService serves models:/$MODEL_NAME@champion"
VERSION=$("$PY" -c "from lmforge.registry import RegistryClient; print(RegistryClient().versions('$MODEL_NAME')[-1])")
"$LMFORGE" registry promote "$MODEL_NAME" "$VERSION" --alias champion
"${KUBECTL[@]}" apply --server-side -f "$WORKDIR/serving.yaml"
"${KUBECTL[@]}" -n "$NAMESPACE" wait --for=condition=Ready "rayservice/$RELEASE" --timeout=1200s

step "9/9 OpenAI requests, then the kind tests"
port_forward "svc/$RELEASE-serving" "$SERVE_PORT:8000"
AUTH=(-H "Authorization: Bearer $API_KEY" -H "Content-Type: application/json")
curl -fsS "${AUTH[@]}" "http://127.0.0.1:$SERVE_PORT/v1/models"; echo
curl -fsS "${AUTH[@]}" "http://127.0.0.1:$SERVE_PORT/v1/completions" \
  -d "{\"model\": \"$MODEL_NAME\", \"prompt\": \"The\", \"max_tokens\": 8}"; echo
cat >"$WORKDIR/state.json" <<EOF
{"context": "$CONTEXT", "namespace": "$NAMESPACE", "release": "$RELEASE", "model": "$MODEL_NAME",
 "version": "$VERSION", "api_key_file": "$WORKDIR/api-key", "manifests": "$WORKDIR/manifests.yaml",
 "kfp_url": "http://127.0.0.1:$KFP_PORT", "mlflow_url": "http://127.0.0.1:$MLFLOW_PORT",
 "serve_url": "http://127.0.0.1:$SERVE_PORT"}
EOF
LMFORGE_KIND_STATE="$WORKDIR/state.json" "$PY" -m pytest -m kind tests/kind -v -p no:cacheprovider
echo "kind e2e passed (state: $WORKDIR/state.json)"
