#!/usr/bin/env bash
# The local Kubernetes production stack for `make test-k8s`:
#   control plane   etcd (Debian) + kube-apiserver, kube-controller-manager, kube-scheduler v1.20.2 (built from Debian's
#                   source package by build-control-plane.sh), on loopback, token auth, RBAC
#   api proxy       apiproxy.py: the API server as clients reach it, translating exactly batch/v1 CronJob,
#                   policy/v1 PodDisruptionBudget and autoscaling/v2 HorizontalPodAutoscaler (translate.py)
#   nodes           nodes.yaml (a GPU node: accelerator label, nvidia.com/gpu taint and capacity; two CPU nodes)
#   node agent      node_agent.py, the stand-in for kubelet + container runtime on every node, and for the CNI
#                   plugin (a bridge with an IP per pod that has ports), kube-proxy and DNS (ClusterIPs, /etc/hosts)
#   services        S3 API (moto server), PostgreSQL (Debian) behind MLflow's tracking server, a ZenML server
# and then runs the given command (e.g. pytest -m k8s) with the environment that reaches them. Every process it
# starts is recorded in $STATE/pids and stopped by the EXIT trap, newest first; nothing else is touched.
#
#   tests/k8s_harness/harness.sh .venv/bin/python -m pytest -m k8s
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
PY="$VENV/bin/python"
BIN="${TAPPER_K8S_CACHE:-$HOME/.cache/tapper-k8s}/v1.20.2/bin"
STATE="$(mktemp -d "${TMPDIR:-/tmp}/tapper-k8s.XXXXXX")"
chmod 755 "$STATE"
mkdir -p "$STATE/logs" "$STATE/pki"
: >"$STATE/pids"

# Loopback ports (override with TAPPER_K8S_PORT_BASE if these are taken).
B="${TAPPER_K8S_PORT_BASE:-0}"
ETCD_PORT=$((12379 + B)); ETCD_PEER=$((12380 + B)); API_PORT=$((16443 + B)); PROXY_PORT=$((16444 + B))
S3_PORT=$((15000 + B)); PG_PORT=$((15432 + B)); MLFLOW_PORT=$((15001 + B)); ZENML_PORT=$((18237 + B))
# The pod network (node_agent.py: a bridge, one network namespace and IP per pod with ports) and the Service range
# (ClusterIPs, addresses of that bridge): distinct per port base, so two harnesses can run side by side.
POD_CIDR="10.244.$((B % 256)).0/24"; SERVICE_CIDR="10.$((96 + B % 64)).0.0/16"; POD_BRIDGE="tapper-br$B"

log() { echo "harness: $*" >&2; }

start() {  # start NAME CMD...: run in the background, log to $STATE/logs/NAME.log, record the PID
  local name=$1; shift
  "$@" >"$STATE/logs/$name.log" 2>&1 &
  echo "$! $name" >>"$STATE/pids"
}

stop_all() {
  local rc=$?
  set +e
  log "stopping (exit $rc)"
  tac "$STATE/pids" | while read -r pid name; do
    kill -TERM "$pid" 2>/dev/null && log "stopped $name ($pid)"
  done
  for _ in $(seq 40); do  # up to 10 s for them to stop (the node agent stops its pods first)
    alive=0
    while read -r pid name; do kill -0 "$pid" 2>/dev/null && alive=1; done <"$STATE/pids"
    [ "$alive" = 0 ] && break
    sleep 0.25
  done
  tac "$STATE/pids" | while read -r pid name; do
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null && log "killed $name ($pid)"
  done
  # What the node agent creates in this machine's network and removes on a clean stop, should it have been killed.
  for ns in "$STATE"/agent/netns/tapper-*; do
    [ -e "$ns" ] && ip netns del "$(basename "$ns")" 2>/dev/null && log "removed network namespace $(basename "$ns")"
  done
  ip link del "$POD_BRIDGE" 2>/dev/null && log "removed bridge $POD_BRIDGE"
  if [ -f "$STATE/pgdata/postmaster.pid" ]; then
    runuser -u postgres -- /usr/lib/postgresql/*/bin/pg_ctl -D "$STATE/pgdata" -m fast stop >/dev/null 2>&1
  fi
  if [ "$rc" -ne 0 ] || [ -n "${TAPPER_K8S_KEEP_STATE:-}" ]; then
    log "state and logs kept in $STATE"
  else
    rm -rf "$STATE"
  fi
  exit "$rc"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

wait_for() {  # wait_for WHAT SECONDS CMD...
  local what=$1 secs=$2; shift 2
  for _ in $(seq $((secs * 4))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.25
  done
  log "$what did not come up in ${secs}s; its log:"; tail -30 "$STATE/logs/$what.log" >&2 || true
  return 1
}

# --- control plane -------------------------------------------------------------------------------------------
for tool in kubectl openssl curl unshare nsenter ip runuser; do
  command -v "$tool" >/dev/null || { log "missing command: $tool"; exit 2; }
done
[ "$(id -u)" = 0 ] || { log "the node agent needs root (mount/UTS/network namespaces, chroot, runAsUser)"; exit 2; }
"$HERE/build-control-plane.sh" --check || { log "no cached control-plane binaries in $BIN (run build-control-plane.sh)"; exit 2; }
command -v etcd >/dev/null || { log "etcd is not installed (build-control-plane.sh --deps)"; exit 2; }

openssl genrsa -out "$STATE/pki/sa.key" 2048 2>/dev/null
openssl rsa -in "$STATE/pki/sa.key" -pubout -out "$STATE/pki/sa.pub" 2>/dev/null
ADMIN_TOKEN="$(openssl rand -hex 24)"
# token,user,uid,"group1,group2": the harness's cluster admin (the user running `kubectl` and submitting pipelines).
echo "$ADMIN_TOKEN,tapper-admin,1000,\"system:masters\"" >"$STATE/pki/tokens.csv"
chmod 600 "$STATE/pki/tokens.csv"

start etcd etcd --name harness --data-dir "$STATE/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
  --initial-cluster "harness=http://127.0.0.1:$ETCD_PEER"
wait_for etcd 30 curl -sf "http://127.0.0.1:$ETCD_PORT/health"

start kube-apiserver "$BIN/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" --insecure-port 0 \
  --cert-dir "$STATE/pki" \
  --token-auth-file "$STATE/pki/tokens.csv" \
  --authorization-mode RBAC \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$STATE/pki/sa.pub" \
  --service-account-signing-key-file "$STATE/pki/sa.key" \
  --service-cluster-ip-range "$SERVICE_CIDR" \
  --disable-admission-plugins TaintNodesByCondition \
  --allow-privileged=true \
  --kubelet-preferred-address-types InternalIP \
  --v 1
CA="$STATE/pki/apiserver.crt"
wait_for kube-apiserver 60 curl -sf --cacert "$CA" -H "Authorization: Bearer $ADMIN_TOKEN" "https://127.0.0.1:$API_PORT/readyz"

# kubeconfig: the context `tapper-harness` reaches the cluster through the translating proxy (what ZenML and the
# tests use); `tapper-harness-direct` is the API server itself.
export KUBECONFIG="$STATE/kubeconfig"
kubectl config set-cluster harness --server "https://127.0.0.1:$PROXY_PORT" --certificate-authority "$CA" --embed-certs >/dev/null
kubectl config set-cluster harness-direct --server "https://127.0.0.1:$API_PORT" --certificate-authority "$CA" --embed-certs >/dev/null
kubectl config set-credentials tapper-admin --token "$ADMIN_TOKEN" >/dev/null
kubectl config set-context tapper-harness --cluster harness --user tapper-admin >/dev/null
kubectl config set-context tapper-harness-direct --cluster harness-direct --user tapper-admin >/dev/null
kubectl config use-context tapper-harness >/dev/null
chmod 600 "$KUBECONFIG"
CP_KUBECONFIG="$STATE/control-plane.kubeconfig"
kubectl config view --raw --minify --context tapper-harness-direct >"$CP_KUBECONFIG"
chmod 600 "$CP_KUBECONFIG"

# The controllers and the scheduler use the direct context. No node-lifecycle controller: the registered nodes
# stay Ready (no kubelet heartbeats them); no service/route/IPAM controllers (no cloud, no pod network).
start kube-controller-manager "$BIN/kube-controller-manager" \
  --kubeconfig "$CP_KUBECONFIG" \
  --controllers '*,-nodeipam,-nodelifecycle,-service,-route,-attachdetach,-cloud-node-lifecycle' \
  --service-account-private-key-file "$STATE/pki/sa.key" --root-ca-file "$CA" --use-service-account-credentials \
  --pvclaimbinder-sync-period 1s --leader-elect=false --port 0 --secure-port 0 --v 1
start kube-scheduler "$BIN/kube-scheduler" \
  --kubeconfig "$CP_KUBECONFIG" --leader-elect=false --port 0 --secure-port 0 --v 1

start apiproxy "$PY" "$HERE/apiproxy.py" --listen "127.0.0.1:$PROXY_PORT" --upstream "https://127.0.0.1:$API_PORT" \
  --cert "$CA" --key "$STATE/pki/apiserver.key"
wait_for apiproxy 30 curl -sf --cacert "$CA" -H "Authorization: Bearer $ADMIN_TOKEN" "https://127.0.0.1:$PROXY_PORT/readyz"

# --- nodes and the node agent ----------------------------------------------------------------------------------
"$PY" "$HERE/node_agent.py" register --nodes "$HERE/nodes.yaml" --kubeconfig "$KUBECONFIG" --context tapper-harness-direct
start node-agent "$PY" "$HERE/node_agent.py" run --nodes "$HERE/nodes.yaml" --kubeconfig "$KUBECONFIG" \
  --context tapper-harness-direct --state "$STATE/agent" --venv "$VENV" --repo "$REPO" \
  --api-host 127.0.0.1 --api-port "$PROXY_PORT" --ca "$CA" --pod-cidr "$POD_CIDR" --bridge "$POD_BRIDGE"
wait_for node-agent 60 test -f "$STATE/agent/ready"
# Storage: PersistentVolumes on this machine's disk for the claims in k8s/ (the serving volume, RWX like NFS/EFS/
# Filestore; the tracking StatefulSets' RWO claims), standing in for a cluster's storage classes.
mkdir -p "$STATE/volumes"
pv() {  # pv NAME SIZE MODE
  mkdir -p "$STATE/volumes/$1" && chmod 777 "$STATE/volumes/$1"
  printf '{"apiVersion":"v1","kind":"PersistentVolume","metadata":{"name":"%s"},"spec":{"capacity":{"storage":"%s"},"accessModes":["%s"],"persistentVolumeReclaimPolicy":"Retain","hostPath":{"path":"%s"}}}\n' \
    "$1" "$2" "$3" "$STATE/volumes/$1"
}
{ pv tapper-models 50Gi ReadWriteMany; pv rwo-20g 20Gi ReadWriteOnce; pv rwo-100g 100Gi ReadWriteOnce; } | kubectl apply -f - >/dev/null
# The default service account and its token secret exist once the controllers act.
wait_for kube-controller-manager 60 kubectl get serviceaccount default -n default

# --- services: S3 API, PostgreSQL + MLflow, ZenML server -----------------------------------------------------
export AWS_ACCESS_KEY_ID="tapper-harness" AWS_SECRET_ACCESS_KEY="$(openssl rand -hex 16)" AWS_DEFAULT_REGION=us-east-1
start s3 "$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT"
wait_for s3 30 curl -sf "http://127.0.0.1:$S3_PORT/moto-api/"
"$PY" - "$S3_PORT" <<'EOF'
import sys, boto3
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}")
for bucket in ("tapper-artifacts", "tapper-mlflow"):
    s3.create_bucket(Bucket=bucket)
EOF

PG_BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
PG_PASSWORD="$(openssl rand -hex 16)"
mkdir -p "$STATE/pgdata" && chown postgres:postgres "$STATE/pgdata" && chmod 700 "$STATE/pgdata"
echo "$PG_PASSWORD" >"$STATE/pgpass" && chown postgres "$STATE/pgpass"
runuser -u postgres -- "$PG_BIN/initdb" -D "$STATE/pgdata" -U mlflow --pwfile "$STATE/pgpass" \
  --auth-host scram-sha-256 --auth-local trust >"$STATE/logs/initdb.log" 2>&1
rm -f "$STATE/pgpass"
# In the foreground under runuser, so the recorded PID is postgres' own parent and the trap stops it.
start postgres runuser -u postgres -- "$PG_BIN/postgres" -D "$STATE/pgdata" -c listen_addresses=127.0.0.1 \
  -p "$PG_PORT" -c unix_socket_directories="$STATE/pgdata"
wait_for postgres 30 "$PG_BIN/pg_isready" -h 127.0.0.1 -p "$PG_PORT"
PGPASSWORD="$PG_PASSWORD" "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U mlflow mlflow

# MLflow: PostgreSQL backend store, artifacts proxied by the server into the S3 bucket (clients need no S3 keys).
start mlflow env MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" "$VENV/bin/mlflow" server \
  --backend-store-uri "postgresql://mlflow:$PG_PASSWORD@127.0.0.1:$PG_PORT/mlflow" \
  --artifacts-destination "s3://tapper-mlflow/artifacts" --serve-artifacts \
  --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
wait_for mlflow 120 curl -sf "http://127.0.0.1:$MLFLOW_PORT/health"

# ZenML server (SQLite store of its own, password login): the pipelines' metadata store, which every pod reaches.
ZENML_PASSWORD="$(openssl rand -hex 16)"
mkdir -p "$STATE/zenml-server"
start zenml-server env ZENML_CONFIG_PATH="$STATE/zenml-server/config" ZENML_LOCAL_STORES_PATH="$STATE/zenml-server/stores" \
  ZENML_SERVER=true ZENML_STORE_URL="sqlite:///$STATE/zenml-server/zenml.db" \
  ZENML_SERVER_AUTH_SCHEME=OAUTH2_PASSWORD_BEARER ZENML_SERVER_JWT_SECRET_KEY="$(openssl rand -hex 32)" \
  ZENML_SERVER_DEPLOYMENT_TYPE=other ZENML_SERVER_AUTO_ACTIVATE=true \
  ZENML_DEFAULT_USER_NAME=default ZENML_DEFAULT_USER_PASSWORD="$ZENML_PASSWORD" \
  "$PY" -m uvicorn zenml.zen_server.zen_server_api:app --host 127.0.0.1 --port "$ZENML_PORT" --log-level warning
wait_for zenml-server 180 curl -sf "http://127.0.0.1:$ZENML_PORT/health"

# --- what the command sees -------------------------------------------------------------------------------------
export TAPPER_K8S_HARNESS="$STATE" TAPPER_K8S_CONTEXT=tapper-harness TAPPER_K8S_NAMESPACE=tapper
export TAPPER_K8S_API="https://127.0.0.1:$API_PORT" TAPPER_K8S_CA="$CA"
export TAPPER_S3_ENDPOINT="http://127.0.0.1:$S3_PORT" TAPPER_S3_BUCKET=tapper-artifacts
export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT" MLFLOW_TRACKING_TOKEN=unused-by-an-open-server
export TAPPER_REGISTRY=registry.tapper.test/tapper
export TAPPER_ZENML_URL="http://127.0.0.1:$ZENML_PORT" TAPPER_ZENML_USER=default TAPPER_ZENML_PASSWORD="$ZENML_PASSWORD"
export TAPPER_K8S_PG_URI="postgresql://mlflow:$PG_PASSWORD@127.0.0.1:$PG_PORT/mlflow"
# For a shell of one's own against the running stack: source "$STATE/env.sh".
export -p | grep -E ' (KUBECONFIG|TAPPER_[A-Z0-9_]*|MLFLOW_[A-Z_]*|AWS_[A-Z_]*)=' >"$STATE/env.sh"
chmod 600 "$STATE/env.sh"
log "up in $SECONDS s: API server https://127.0.0.1:$API_PORT (proxy :$PROXY_PORT), S3 :$S3_PORT, MLflow :$MLFLOW_PORT, ZenML :$ZENML_PORT; state $STATE"

if [ $# -eq 0 ]; then
  log "no command given; holding the stack up until interrupted (KUBECONFIG=$KUBECONFIG)"
  while true; do sleep 3600 & wait $!; done  # `wait` lets the INT/TERM trap run at once
fi
"$@"
