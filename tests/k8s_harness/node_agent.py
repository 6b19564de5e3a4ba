"""The harness's node agent: the one stand-in, for the kubelet and the container runtime of every registered node.

`register` creates the Node objects of nodes.yaml with the labels, taints, capacity and Ready status a kubelet
would report. `run` then does, for every pod the real scheduler binds to one of those nodes, what a kubelet does
(with the limits listed below):

* resolves the image through images.yaml: a project image by repository name (ENTRYPOINT/CMD/WORKDIR/ENV/USER from
  its Dockerfile), a listed third-party image by exact reference (run from this machine's packages as the table
  says, with the accounts and directories of its layers); an image not listed leaves the container Waiting with
  reason ErrImagePull;
* builds the environment: the image's ENV, the container's `env` (value, secretKeyRef, configMapKeyRef, fieldRef,
  resourceFieldRef) and `envFrom` (ConfigMaps, Secrets), HOSTNAME and KUBERNETES_SERVICE_HOST/PORT; a missing
  Secret or ConfigMap that is not optional leaves the container Waiting with CreateContainerConfigError;
* mounts the pod's volumes: secret (including the service-account token secret that v1.20's admission adds),
  configMap, emptyDir, persistentVolumeClaim (through its bound PersistentVolume's hostPath or local path) and
  hostPath, each at its mountPath (readOnly honoured);
* runs each container's command and args as a local process, init containers first, in its own mount and UTS
  namespace (hostname = pod name) on a copy-on-write overlay of this machine's root filesystem with a private
  /tmp, as the container's runAsUser/runAsGroup, with a read-only root when readOnlyRootFilesystem is set;
* gives a pod whose containers declare ports a sandbox (PodNetwork: a network namespace shared by its containers,
  a veth on the agent's bridge, a pod IP), so replicas and other pods can bind the same port; pods without ports
  share the machine's network, where the API server, S3, MLflow and ZenML listen;
* makes Services reachable (ServiceProxy, kube-proxy's userspace mode: ClusterIPs on the bridge, relays to the
  Endpoints' ready addresses) and resolvable (/etc/hosts in each container);
* runs startup, readiness and liveness probes as the kubelet does: httpGet and tcpSocket from the node to the pod
  IP, exec inside the container (its namespaces, root, working directory, env and user);
* reports phase, conditions, container states, exit codes and restart counts through the API, restarts
  containers per restartPolicy with back-off (CrashLoopBackOff), serves each node's kubelet API for
  `kubectl logs` (/containerLogs, with follow and tailLines), and on deletion stops the processes
  (SIGTERM, then SIGKILL after the grace period, capped at 10 s) and removes the pod.

Limits (a real cluster is still needed for these): no images, so the image's own files are this machine's
files plus the project's virtual environment; no resource limits, cgroups or OOM kills (requests only count
for scheduling); one bridge on one machine instead of a CNI plugin, no NetworkPolicy, no cluster DNS server (only
/etc/hosts, written at container start), pods without ports in the machine's network; no GPU device
plugin (`nvidia.com/gpu` is capacity on paper); no exec/attach/port-forward, no downwardAPI or projected
volumes, no ephemeral containers, no image pull secrets, no node heartbeats or evictions.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
import http.client
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

HERE = Path(__file__).resolve().parent
AGENT_VERSION = "v1.20.2-tapper-node-agent"
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def log(msg: str) -> None:
    print(f"{datetime.now().strftime('%H:%M:%S')} node-agent: {msg}", file=sys.stderr, flush=True)


def load_nodes(path: str) -> list[dict]:
    return yaml.safe_load(Path(path).read_text())["nodes"]


def api(kubeconfig: str, context: str) -> client.CoreV1Api:
    config.load_kube_config(config_file=kubeconfig, context=context)
    return client.CoreV1Api()


# --- registration ------------------------------------------------------------------------------------------------


def register(args) -> None:
    core = api(args.kubeconfig, args.context)
    for n in load_nodes(args.nodes):
        labels = {
            "kubernetes.io/hostname": n["name"],
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "beta.kubernetes.io/os": "linux",
            "beta.kubernetes.io/arch": "amd64",
            **n.get("labels", {}),
        }
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": n["name"], "labels": labels},
            "spec": {"taints": n.get("taints", [])},
        }
        try:
            core.create_node(body)
        except ApiException as err:
            if err.status != 409:
                raise
        t = now()
        cond = lambda typ, status, reason, msg: {
            "type": typ,
            "status": status,
            "reason": reason,
            "message": msg,  # noqa: E731
            "lastHeartbeatTime": t,
            "lastTransitionTime": t,
        }
        status = {
            "status": {
                "capacity": n["capacity"],
                "allocatable": n["capacity"],
                "conditions": [
                    cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "node agent"),
                    cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "node agent"),
                    cond("PIDPressure", "False", "KubeletHasSufficientPID", "node agent"),
                    cond("Ready", "True", "KubeletReady", "tapper node agent is posting ready status"),
                ],
                "addresses": [
                    {"type": "InternalIP", "address": "127.0.0.1"},
                    {"type": "Hostname", "address": n["name"]},
                ],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": int(n["kubeletPort"])}},
                "nodeInfo": {
                    "machineID": n["name"],
                    "systemUUID": n["name"],
                    "bootID": "harness",
                    "kernelVersion": os.uname().release,
                    "osImage": "tapper harness",
                    "containerRuntimeVersion": "tapper-node-agent://1",
                    "kubeletVersion": AGENT_VERSION,
                    "kubeProxyVersion": "none",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                },
            }
        }
        core.patch_node_status(n["name"], status)
        log(f"registered node {n['name']}")


# --- images ------------------------------------------------------------------------------------------------------


@dataclass
class Image:
    entrypoint: list[str]
    cmd: list[str]
    workdir: str
    env: dict[str, str]
    user: str | None
    venv: bool = True  # a project image: PATH is the virtual environment's bin first
    prepare: dict = field(default_factory=dict)  # upstream images: users, groups, dirs of the image's layers


def parse_dockerfile(path: Path) -> Image:
    """ENTRYPOINT, CMD, WORKDIR, ENV and USER of a Dockerfile's final stage."""
    text = re.sub(r"\\\n", " ", path.read_text())
    image = Image([], [], "/", {}, None)
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word, rest = word.upper(), rest.strip()
        if word == "FROM":
            image = Image([], [], "/", {}, None)
        elif word == "ENV":
            parts = shlex.split(rest)
            if parts and "=" not in parts[0]:  # legacy `ENV KEY value`
                image.env[parts[0]] = " ".join(parts[1:])
            for p in parts:
                if "=" in p:
                    k, v = p.split("=", 1)
                    image.env[k] = v
        elif word == "WORKDIR":
            image.workdir = rest if rest.startswith("/") else os.path.join(image.workdir, rest)
        elif word in ("ENTRYPOINT", "CMD"):
            value = json.loads(rest) if rest.startswith("[") else ["/bin/sh", "-c", rest]
            if word == "ENTRYPOINT":
                image.entrypoint, image.cmd = value, []
            else:
                image.cmd = value
        elif word == "USER":
            image.user = rest
    return image


def image_table(repo: Path, venv: Path) -> tuple[dict[str, Image], dict[str, Image]]:
    """images.yaml: (project images by repository name, upstream images by normalized reference)."""
    table = yaml.safe_load((HERE / "images.yaml").read_text())
    project = {name: parse_dockerfile(repo / dockerfile) for name, dockerfile in table["images"].items()}
    upstream = {}
    for ref, e in (table.get("upstream") or {}).items():
        missing = [p for p in e.get("requires") or [] if not Path(p).exists()]
        if missing:
            log(f"image {ref}: not runnable here (missing {', '.join(missing)}); its pods will wait with ErrImagePull")
            continue
        sub = lambda s: s.replace("{repo}", str(repo)).replace("{venv}", str(venv))  # noqa: E731
        upstream[normalize_reference(ref)] = Image(
            [sub(a) for a in e.get("entrypoint") or []],
            [sub(a) for a in e.get("cmd") or []],
            e.get("workdir", "/"),
            {k: sub(str(v)) for k, v in (e.get("env") or {}).items()},
            e.get("user"),
            venv=False,
            prepare={k: e[k] for k in ("users", "groups", "dirs") if e.get(k)},
        )
    return project, upstream


def normalize_reference(image: str) -> str:
    for prefix in ("docker.io/library/", "docker.io/", "index.docker.io/library/"):
        if image.startswith(prefix):
            image = image[len(prefix) :]
            break
    return image


def image_repository(image: str) -> str:
    name = image.split("@")[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":")[0]


# --- the pod network and Services --------------------------------------------------------------------------------


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


class PodNetwork:
    """The stand-in for a CNI plugin: a Linux bridge on this machine (gateway = the CIDR's first address) and, per
    pod that declares a container port, a network namespace (the pod sandbox, shared by its containers, kept across
    container restarts) with a veth on the bridge and its own pod IP. Pods without ports stay in the machine's
    network (127.0.0.1), where the harness's API server, S3, MLflow and ZenML listen."""

    def __init__(self, cidr: str, bridge: str, state: Path):
        base, bits = cidr.split("/")
        assert bits == "24", "the node agent's pod network is one /24"
        self.cidr, self.bridge, self.prefix = cidr, bridge, base.rsplit(".", 1)[0]
        self.gateway = f"{self.prefix}.1"
        self.free = [f"{self.prefix}.{i}" for i in range(2, 255)]
        self.lock = threading.Lock()
        self.record = state / "netns"  # what the harness removes should this agent die without cleaning up
        self.record.mkdir(parents=True, exist_ok=True)
        ip("link", "del", bridge, check=False)  # a leftover of a killed run of this harness
        ip("link", "add", bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/24", "dev", bridge)
        ip("link", "set", bridge, "up")

    def sandbox(self, uid: str) -> tuple[str, str]:
        """A new pod sandbox: (network namespace name, pod IP)."""
        with self.lock:
            addr = self.free.pop(0)
        name, host, peer = f"tapper-{uid[:8]}", f"tv{uid[:8]}", f"tp{uid[:8]}"
        (self.record / name).touch()
        ip("netns", "add", name)
        ip("link", "add", host, "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "netns", name)
        ip("link", "set", host, "master", self.bridge)
        ip("link", "set", host, "up")
        for args in (
            ("link", "set", "lo", "up"),
            ("link", "set", peer, "name", "eth0"),
            ("addr", "add", f"{addr}/24", "dev", "eth0"),
            ("link", "set", "eth0", "up"),
            ("route", "add", "default", "via", self.gateway),
        ):
            ip("-n", name, *args)
        return name, addr

    def release(self, name: str, addr: str) -> None:
        ip("netns", "del", name, check=False)  # its veth pair goes with it
        ip("link", "del", f"tv{name.removeprefix('tapper-')}", check=False)
        (self.record / name).unlink(missing_ok=True)
        with self.lock:
            self.free.append(addr)

    def close(self) -> None:
        ip("link", "del", self.bridge, check=False)


class ServiceProxy:
    """The stand-in for kube-proxy and cluster DNS. kube-proxy's original userspace mode: every Service's ClusterIP
    is an address of the pod bridge (so pods reach it through their default route, and this machine directly), with
    a listener per TCP port that relays each connection to one of the ready addresses of the Service's Endpoints
    (which the real endpoints controller keeps from the pods' readiness), round robin; none ready: the connection is
    closed. DNS: each container's /etc/hosts gets <svc>, <svc>.<ns>, <svc>.<ns>.svc and <svc>.<ns>.svc.cluster.local
    for the Services that exist when it starts (short names for its own namespace)."""

    def __init__(self, core: client.CoreV1Api, net: PodNetwork):
        self.core, self.net = core, net
        self.listeners: dict[tuple[str, int], socket.socket] = {}
        self.endpoints: dict[tuple[str, str], list] = {}
        self.rr: dict[tuple, int] = {}
        self.stopping = False

    def hosts(self, namespace: str) -> list[str]:
        lines = []
        for s in self.core.list_service_for_all_namespaces().items:
            cip = s.spec.cluster_ip
            if not cip or cip == "None":
                continue
            n, ns = s.metadata.name, s.metadata.namespace
            names = ([n] if ns == namespace else []) + [f"{n}.{ns}", f"{n}.{ns}.svc", f"{n}.{ns}.svc.cluster.local"]
            lines.append(f"{cip}\t{' '.join(names)}")
        return lines

    def loop(self) -> None:
        while not self.stopping:
            try:
                self.sync()
            except Exception:  # noqa: BLE001
                log("service proxy sync failed:\n" + traceback.format_exc())
            time.sleep(1)
        for sock in self.listeners.values():
            sock.close()

    def sync(self) -> None:
        eps = {}
        for e in self.core.list_endpoints_for_all_namespaces().items:
            eps[(e.metadata.namespace, e.metadata.name)] = e.subsets or []
        self.endpoints = eps
        want = {}
        for s in self.core.list_service_for_all_namespaces().items:
            cip = s.spec.cluster_ip
            if not cip or cip == "None":
                continue
            for port in s.spec.ports or []:
                if (port.protocol or "TCP") == "TCP":
                    want[(cip, port.port)] = (s.metadata.namespace, s.metadata.name, port.name)
        for key in set(self.listeners) - set(want):
            self.listeners.pop(key).close()
        for key, svc in want.items():
            if key in self.listeners:
                continue
            cip, port = key
            ip("addr", "add", f"{cip}/32", "dev", self.net.bridge, check=False)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(key)
            except OSError as err:
                log(f"service {svc[0]}/{svc[1]}: cannot listen on {cip}:{port}: {err}")
                sock.close()
                continue
            sock.listen(64)
            self.listeners[key] = sock
            threading.Thread(target=self.accept, args=(sock, svc), daemon=True, name=f"svc-{svc[1]}-{port}").start()
            log(f"service {svc[0]}/{svc[1]}: {cip}:{port}")

    def backend(self, svc: tuple, fresh: bool = False) -> tuple[str, int] | None:
        ns, name, port_name = svc
        if fresh or not self.endpoints.get((ns, name)):  # this proxy syncs every second: look again before refusing
            try:
                self.endpoints[(ns, name)] = self.core.read_namespaced_endpoints(name, ns).subsets or []
            except ApiException:
                pass
        choices = []
        for sub in self.endpoints.get((ns, name), []):
            ports = [p.port for p in sub.ports or [] if p.name == port_name or len(sub.ports) == 1]
            for a in sub.addresses or []:
                choices += [(a.ip, p) for p in ports[:1]]
        if not choices:
            return None
        i = self.rr.get(svc, 0)
        self.rr[svc] = i + 1
        return choices[i % len(choices)]

    def accept(self, sock: socket.socket, svc: tuple) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self.relay, args=(conn, svc), daemon=True).start()

    def relay(self, conn: socket.socket, svc: tuple) -> None:
        up = None
        for attempt in range(3):  # as the userspace proxier: another endpoint (freshly read) when one fails
            target = self.backend(svc, fresh=attempt > 0)
            if target is None:
                break
            try:
                up = socket.create_connection(target, timeout=2)
                break
            except OSError:
                continue
        if up is None:
            conn.close()
            return
        up.settimeout(None)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        t = threading.Thread(target=pump, args=(up, conn), daemon=True)
        t.start()
        pump(conn, up)
        t.join()
        conn.close()
        up.close()


# --- pods --------------------------------------------------------------------------------------------------------


class ConfigError(Exception):
    """CreateContainerConfigError: the pod refers to something that does not exist."""


@dataclass
class Container:
    spec: dict
    init: bool
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    started_at: str | None = None
    restarts: int = 0
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict = field(default_factory=dict)
    ready: bool = False
    started: bool = False  # startup probe passed (or none)
    next_start: float = 0.0
    probe_at: dict = field(default_factory=dict)
    probe_failures: dict = field(default_factory=dict)
    done: bool = False  # terminated and will not be restarted
    env: dict = field(default_factory=dict)  # as launched: for exec probes
    user: int | None = None
    group: int | None = None


class Pod:
    def __init__(self, agent: "Agent", pod: client.V1Pod):
        self.agent = agent
        self.uid = pod.metadata.uid
        self.name = pod.metadata.name
        self.ns = pod.metadata.namespace
        self.node = pod.spec.node_name
        self.raw = agent.core.api_client.sanitize_for_serialization(pod)
        self.dir = agent.state / "pods" / f"{self.ns}_{self.name}_{self.uid[:8]}"
        self.dir.mkdir(parents=True, exist_ok=True)
        spec = self.raw["spec"]
        self.restart_policy = spec.get("restartPolicy", "Always")
        self.inits = [Container(c, True) for c in spec.get("initContainers") or []]
        self.mains = [Container(c, False) for c in spec.get("containers") or []]
        self.phase = "Pending"
        self.start_time = now()
        self.config_error: str | None = None
        self.image_error: str | None = None
        self.mounts: dict[str, Path] | None = None
        self.last_status: str | None = None
        self.terminating = False
        # A pod whose containers declare ports gets a sandbox: its own network namespace and pod IP (PodNetwork).
        self.wants_net = any(p.get("containerPort") for c in self.inits + self.mains for p in c.spec.get("ports") or [])
        self.netns: str | None = None
        self.ip: str | None = None
        self.net_lock = threading.Lock()

    @property
    def pod_ip(self) -> str:
        return self.ip or "127.0.0.1"

    # -- resolution --
    def _get(self, kind: str, name: str):
        try:
            if kind == "secret":
                return self.agent.core.read_namespaced_secret(name, self.ns)
            return self.agent.core.read_namespaced_config_map(name, self.ns)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def _data(self, kind: str, name: str, optional: bool) -> dict[str, str] | None:
        obj = self._get(kind, name)
        if obj is None:
            if optional:
                return None
            raise ConfigError(f'{kind} "{name}" not found')
        if kind == "secret":
            return {k: base64.b64decode(v).decode() for k, v in (obj.data or {}).items()}
        return dict(obj.data or {})

    def _field(self, path: str) -> str:
        meta, spec = self.raw["metadata"], self.raw["spec"]
        m = re.match(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return (meta.get(m[1]) or {}).get(m[2], "")
        return {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": spec.get("nodeName", ""),
            "spec.serviceAccountName": spec.get("serviceAccountName", ""),
            "status.podIP": self.pod_ip,
            "status.hostIP": "127.0.0.1",
        }.get(path, "")

    def environment(self, c: dict, image: Image) -> dict[str, str]:
        venv_bin = str(self.agent.venv / "bin")
        env = {
            "PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            if image.venv
            else "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        }
        for k, v in image.env.items():
            env[k] = v if k != "PATH" or not image.venv else env["PATH"]
        env.update(
            {
                "HOSTNAME": self.name,
                "KUBERNETES_SERVICE_HOST": self.agent.api_host,
                "KUBERNETES_SERVICE_PORT": str(self.agent.api_port),
                "KUBERNETES_SERVICE_PORT_HTTPS": str(self.agent.api_port),
                "KUBERNETES_PORT": f"tcp://{self.agent.api_host}:{self.agent.api_port}",
            }
        )
        for src in c.get("envFrom") or []:
            prefix = src.get("prefix", "")
            for kind, key in (("configmap", "configMapRef"), ("secret", "secretRef")):
                if key in src:
                    data = self._data(kind, src[key]["name"], src[key].get("optional", False)) or {}
                    env.update({prefix + k: v for k, v in data.items()})
        for e in c.get("env") or []:
            if "value" in e:
                env[e["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), e["value"])
            elif "valueFrom" in e:
                vf = e["valueFrom"]
                for kind, key in (("secret", "secretKeyRef"), ("configmap", "configMapKeyRef")):
                    if key in vf:
                        ref = vf[key]
                        data = self._data(kind, ref["name"], ref.get("optional", False))
                        if data is None:
                            break
                        if ref["key"] not in data:
                            if ref.get("optional"):
                                break
                            raise ConfigError(f"couldn't find key {ref['key']} in {kind} {self.ns}/{ref['name']}")
                        env[e["name"]] = data[ref["key"]]
                if "fieldRef" in vf:
                    env[e["name"]] = self._field(vf["fieldRef"]["fieldPath"])
                if "resourceFieldRef" in vf:
                    res = vf["resourceFieldRef"]["resource"]  # limits.cpu, requests.memory, ...
                    kind, _, name = res.partition(".")
                    env[e["name"]] = str(((c.get("resources") or {}).get(kind) or {}).get(name, "0"))
        return env

    def prepare_volumes(self) -> dict[str, Path]:
        """Each volume as a directory of this machine, by volume name."""
        out: dict[str, Path] = {}
        vdir = self.dir / "volumes"
        for v in self.raw["spec"].get("volumes") or []:
            name = v["name"]
            target = vdir / name
            if "emptyDir" in v:
                target.mkdir(parents=True, exist_ok=True)
                target.chmod(0o777)
            elif "secret" in v or "configMap" in v:
                kind = "secret" if "secret" in v else "configmap"
                src = v["secret"] if kind == "secret" else v["configMap"]
                data = self._data(kind, src.get("secretName") or src.get("name"), src.get("optional", False)) or {}
                target.mkdir(parents=True, exist_ok=True)
                items = src.get("items")
                for key, value in data.items():
                    paths = [i["path"] for i in items if i["key"] == key] if items else [key]
                    for p in paths:
                        f = target / p
                        f.parent.mkdir(parents=True, exist_ok=True)
                        f.write_text(value)
                        f.chmod(src.get("defaultMode", 0o644) & 0o777)
            elif "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                pvc = self.agent.core.read_namespaced_persistent_volume_claim(claim, self.ns)
                if pvc.status.phase != "Bound" or not pvc.spec.volume_name:
                    raise ConfigError(f"persistentvolumeclaim {claim} is not bound")
                pv = self.agent.core.read_persistent_volume(pvc.spec.volume_name)
                path = (pv.spec.host_path and pv.spec.host_path.path) or (pv.spec.local and pv.spec.local.path)
                if not path:
                    raise ConfigError(f"persistentvolume {pv.metadata.name} has no hostPath or local path")
                target = Path(path)
                target.mkdir(parents=True, exist_ok=True)
            elif "hostPath" in v:
                target = Path(v["hostPath"]["path"])
            else:
                raise ConfigError(f"volume {name}: type not supported by the node agent ({sorted(set(v) - {'name'})})")
            out[name] = target
        return out

    def ensure_sandbox(self) -> None:
        """The pod's network namespace and IP, made once, before its volumes and containers (as the kubelet makes the
        sandbox first): the pod IP it reports never changes."""
        with self.net_lock:
            if self.wants_net and self.netns is None and not self.terminating:
                try:
                    self.netns, self.ip = self.agent.net.sandbox(self.uid)
                except RuntimeError as err:
                    raise ConfigError(f"failed to create pod sandbox: {err}") from err
                log(f"{self.ns}/{self.name}: sandbox {self.netns}, pod IP {self.ip}")

    # -- containers --
    def launch(self, c: Container) -> None:
        spec = c.spec
        image = self.agent.image(spec["image"])
        assert image is not None
        if spec.get("command"):
            argv = list(spec["command"]) + list(spec.get("args") or [])
        elif spec.get("args") is not None:
            argv = list(image.entrypoint) + list(spec["args"])
        else:
            argv = list(image.entrypoint) + list(image.cmd)
        env = self.environment(spec, image)
        argv = [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), a) for a in argv]
        if not argv:
            raise ConfigError("no command specified")
        sc = {**(self.raw["spec"].get("securityContext") or {}), **(spec.get("securityContext") or {})}
        user = sc.get("runAsUser")
        group = sc.get("runAsGroup")
        if user is None and image.user:
            u, _, g = image.user.partition(":")
            user = int(u) if u.isdigit() else None
            group = int(g) if g.isdigit() else group
        mounts = []
        for m in spec.get("volumeMounts") or []:
            src = self.mounts[m["name"]]
            if m.get("subPath"):
                src = src / m["subPath"]
                src.mkdir(parents=True, exist_ok=True)
            mounts.append({"source": str(src), "target": m["mountPath"], "readOnly": bool(m.get("readOnly"))})
        self.ensure_sandbox()
        net = self.netns is not None
        cdir = self.dir / f"{'init' if c.init else 'c'}-{spec['name']}"
        cdir.mkdir(parents=True, exist_ok=True)
        launch = {
            "argv": argv,
            "env": env,
            "workdir": spec.get("workingDir") or image.workdir,
            "mounts": mounts,
            "hostname": self.name,
            "dir": str(cdir),
            "user": user,
            "group": group,
            "fsGroup": (self.raw["spec"].get("securityContext") or {}).get("fsGroup"),
            "readOnlyRoot": bool(sc.get("readOnlyRootFilesystem")),
            "net": net,
            "home": env.get("HOME") or ("/tmp/home" if not user else image.workdir),
            # the project's virtual environment (and, for its editable install, the repository)
            "hostPaths": [str(self.agent.venv), str(self.agent.repo)],
            "podIP": self.pod_ip,
            "hosts": self.agent.proxy.hosts(self.ns),
            "prepare": image.prepare,
        }
        (cdir / "launch.json").write_text(json.dumps(launch))
        c.log_path = cdir / "log"
        logf = open(c.log_path, "ab")
        sandbox = ["nsenter", f"--net=/run/netns/{self.netns}"] if net else []
        c.proc = subprocess.Popen(
            [
                *sandbox,
                "unshare",
                "--mount",
                "--uts",
                sys.executable,
                str(Path(__file__).resolve()),
                "exec",
                str(cdir / "launch.json"),
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        logf.close()
        c.started_at = now()
        c.state = {"running": {"startedAt": c.started_at}}
        c.ready = False
        c.started = "startupProbe" not in spec
        c.probe_at, c.probe_failures = {}, {}
        c.env, c.user, c.group = env, user, group
        log(
            f"{self.ns}/{self.name} on {self.node}: started {spec['name']} (pid {c.proc.pid}): {shlex.join(argv)[:200]}"
        )

    def kill(self, c: Container, grace: float) -> None:
        if c.proc is None or c.proc.poll() is not None:
            return
        try:
            os.killpg(c.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.time() + grace
        while time.time() < deadline and c.proc.poll() is None:
            time.sleep(0.1)
        if c.proc.poll() is None:
            try:
                os.killpg(c.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            c.proc.wait()

    def probe(self, c: Container, kind: str) -> bool | None:
        """Run the container's probe of this kind when due: True/False, or None when not due."""
        p = c.spec.get(kind)
        if not p:
            return None
        t = time.time()
        due = c.probe_at.get(kind)
        if due is None:
            due = t + p.get("initialDelaySeconds", 0)
            c.probe_at[kind] = due
        if t < due:
            return None
        c.probe_at[kind] = t + p.get("periodSeconds", 10)
        timeout = p.get("timeoutSeconds", 1)
        ports = {q.get("name"): q["containerPort"] for q in c.spec.get("ports") or []}
        # As the kubelet does: HTTP and TCP probes from the node to the pod IP (127.0.0.1 for a pod in the machine's
        # network); exec probes inside the container: its namespaces, root, working directory, env and user.
        try:
            if "httpGet" in p:
                g = p["httpGet"]
                port = ports.get(g["port"], g["port"])
                url = f"http://{self.pod_ip}:{port}{g.get('path', '/')}"
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                with opener.open(url, timeout=timeout) as r:
                    ok = 200 <= r.status < 400
            elif "tcpSocket" in p:
                port = ports.get(p["tcpSocket"]["port"], p["tcpSocket"]["port"])
                socket.create_connection((self.pod_ip, int(port)), timeout=timeout).close()
                ok = True
            elif "exec" in p:
                ids = (
                    [f"--setuid={c.user}", f"--setgid={c.group if c.group is not None else c.user}"]
                    if c.user is not None
                    else []
                )
                ok = (
                    subprocess.run(
                        ["nsenter", "-t", str(c.proc.pid), "-m", "-u", "-r", "-w"]
                        + (["-n"] if self.netns else [])
                        + ids
                        + ["--", "/bin/sh", "-c", "exec " + shlex.join(p["exec"]["command"])],
                        env=c.env,
                        capture_output=True,
                        timeout=timeout + 5,
                    ).returncode
                    == 0
                )
            else:
                ok = False
        except (subprocess.TimeoutExpired, OSError, ValueError, http.client.HTTPException):
            ok = False
        if ok:
            c.probe_failures[kind] = 0
            return True
        c.probe_failures[kind] = c.probe_failures.get(kind, 0) + 1
        return c.probe_failures[kind] < p.get("failureThreshold", 3) and None

    # -- the pod's lifecycle, one step per agent tick --
    def tick(self) -> None:
        if self.phase in ("Succeeded", "Failed"):
            return
        if self.mounts is None:
            try:
                for c in self.inits + self.mains:
                    if self.agent.image(c.spec["image"]) is None:
                        self.image_error = (
                            f'node agent cannot run image "{c.spec["image"]}": not in tests/k8s_harness/images.yaml'
                        )
                        c.state = {"waiting": {"reason": "ErrImagePull", "message": self.image_error}}
                if self.image_error:
                    return
                self.ensure_sandbox()
                self.mounts = self.prepare_volumes()
                for c in self.inits + self.mains:  # resolve every env now: a missing reference is a config error
                    self.environment(c.spec, self.agent.image(c.spec["image"]))
                self.config_error = None
            except ConfigError as err:
                self.mounts = None
                self.config_error = str(err)
                for c in self.inits + self.mains:
                    c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(err)}}
                return
        pending_init = [c for c in self.inits if not c.done]
        if pending_init:
            c = pending_init[0]
            self._step(c)
            if c.done and c.state.get("terminated", {}).get("exitCode") != 0 and self.restart_policy == "Never":
                self.phase = "Failed"
            return
        self.phase = "Running"
        for c in self.mains:
            self._step(c)
        if all(c.done for c in self.mains):
            codes = [c.state["terminated"]["exitCode"] for c in self.mains]
            self.phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
            log(f"{self.ns}/{self.name}: {self.phase} (exit codes {codes})")

    def _step(self, c: Container) -> None:
        if c.done:
            return
        if c.proc is None:
            if time.time() < c.next_start:
                return
            try:
                self.launch(c)
            except ConfigError as err:
                c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(err)}}
                c.next_start = time.time() + 2
            return
        rc = c.proc.poll()
        if rc is None:
            if not c.started:
                r = self.probe(c, "startupProbe")
                if r:
                    c.started = True
                elif r is False:
                    self.kill(c, 5)
            else:
                if c.spec.get("readinessProbe"):
                    r = self.probe(c, "readinessProbe")
                    if r is not None:
                        c.ready = bool(r)
                else:
                    c.ready = True
                if self.probe(c, "livenessProbe") is False:
                    log(f"{self.ns}/{self.name}: {c.spec['name']} failed its liveness probe; restarting")
                    self.kill(c, 5)
            return
        finished = now()
        term = {
            "exitCode": rc if rc >= 0 else 128 - rc,
            "reason": "Completed" if rc == 0 else "Error",
            "startedAt": c.started_at,
            "finishedAt": finished,
            "containerID": f"tapper://{c.proc.pid}",
        }
        if rc != 0 and c.log_path is not None:
            term["message"] = c.log_path.read_bytes()[-2048:].decode(errors="replace")
        c.proc, c.ready = None, False
        restart = (
            not c.init and (self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and rc != 0))
        ) or (c.init and rc != 0 and self.restart_policy != "Never")
        if restart and not self.terminating:
            c.restarts += 1
            backoff = min(10 * 2 ** (c.restarts - 1), 300) if rc != 0 else 1
            c.next_start = time.time() + backoff
            c.last_state = {"terminated": term}
            c.state = {
                "waiting": {
                    "reason": "CrashLoopBackOff" if rc != 0 else "ContainerCreating",
                    "message": f"back-off {backoff}s restarting failed container={c.spec['name']} pod={self.name}",
                }
            }
        else:
            c.state = {"terminated": term}
            c.done = True

    def status(self) -> dict:
        def cs(c: Container) -> dict:
            return {
                "name": c.spec["name"],
                "image": c.spec["image"],
                "imageID": f"tapper-node-agent://{c.spec['image']}",
                "ready": c.ready,
                "started": bool(c.proc) and c.started,
                "restartCount": c.restarts,
                "state": c.state,
                "lastState": c.last_state,
                **({"containerID": f"tapper://{c.proc.pid}"} if c.proc else {}),
            }

        t = now()
        mains_ready = bool(self.mains) and all(c.ready for c in self.mains)
        inits_done = all(c.done and c.state.get("terminated", {}).get("exitCode") == 0 for c in self.inits)
        cond = lambda typ, ok: {
            "type": typ,
            "status": "True" if ok else "False",
            "lastProbeTime": None,  # noqa: E731
            "lastTransitionTime": t,
        }
        conditions = [
            cond("Initialized", inits_done),
            cond("Ready", mains_ready),
            cond("ContainersReady", mains_ready),
            {"type": "PodScheduled", "status": "True", "lastProbeTime": None, "lastTransitionTime": t},
        ]
        if self.phase in ("Succeeded", "Failed"):
            conditions[1]["reason"] = conditions[2]["reason"] = "PodCompleted"
        # A pod with ports has no IP until its sandbox exists (the API server refuses to change a pod IP once set).
        ips = {} if self.wants_net and self.ip is None else {"podIP": self.pod_ip, "podIPs": [{"ip": self.pod_ip}]}
        return {
            "phase": self.phase,
            "conditions": conditions,
            "hostIP": "127.0.0.1",
            **ips,
            "startTime": self.start_time,
            "qosClass": self.raw.get("status", {}).get("qosClass"),
            "initContainerStatuses": [cs(c) for c in self.inits],
            "containerStatuses": [cs(c) for c in self.mains],
        }

    def report(self) -> None:
        st = self.status()
        key = json.dumps(
            {**st, "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in st["conditions"]]},
            sort_keys=True,
        )
        if key == self.last_status:
            return
        try:
            self.agent.core.patch_namespaced_pod_status(self.name, self.ns, {"status": st})
            self.last_status = key
        except ApiException as err:
            if err.status != 404:
                log(f"{self.ns}/{self.name}: status update failed: {err.status} {err.reason}")

    def stop(self, grace: float) -> None:
        self.terminating = True
        for c in self.inits + self.mains:
            self.kill(c, grace)
        with self.net_lock:
            if self.netns is not None:
                self.agent.net.release(self.netns, self.ip)
                self.netns = None

    def logs(self, container: str | None) -> Path | None:
        for c in self.mains + self.inits:
            if container in (None, c.spec["name"]):
                return c.log_path or (self.dir / f"{'init' if c.init else 'c'}-{c.spec['name']}" / "log")
        return None


class Agent:
    def __init__(self, args):
        self.core = api(args.kubeconfig, args.context)
        self.nodes = {n["name"]: n for n in load_nodes(args.nodes)}
        self.state = Path(args.state)
        self.state.mkdir(parents=True, exist_ok=True)
        self.venv = Path(args.venv).resolve()
        self.repo = Path(args.repo).resolve()
        self.images, self.upstream = image_table(self.repo, self.venv)
        self.api_host, self.api_port = args.api_host, args.api_port
        self.net = PodNetwork(args.pod_cidr, args.bridge, self.state)
        self.proxy = ServiceProxy(self.core, self.net)
        self.pods: dict[str, Pod] = {}
        self.lock = threading.Lock()
        self.stopping = False

    def image(self, ref: str) -> Image | None:
        """An upstream image by its exact reference, else a project image by its repository name."""
        return self.upstream.get(normalize_reference(ref.split("@")[0])) or self.images.get(image_repository(ref))

    def serve_kubelet_api(self) -> None:
        key, crt = self.state / "kubelet.key", self.state / "kubelet.crt"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(crt),
                "-days",
                "2",
                "-subj",
                "/CN=tapper-node-agent",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )
        agent = self
        for name, n in self.nodes.items():

            class Handler(BaseHTTPRequestHandler):
                node = name
                protocol_version = "HTTP/1.1"

                def log_message(self, *a):
                    pass

                def do_GET(self):
                    url = urlsplit(self.path)
                    m = re.match(r"^/containerLogs/([^/]+)/([^/]+)/([^/]+)$", url.path)
                    q = parse_qs(url.query)
                    with agent.lock:
                        pod = next(
                            (
                                p
                                for p in agent.pods.values()
                                if m and p.ns == m[1] and p.name == m[2] and p.node == self.node
                            ),
                            None,
                        )
                    path = pod.logs(m[3]) if pod else None
                    if path is None or not path.exists():
                        self.send_response(404)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()

                    def chunk(data: bytes) -> None:
                        if data:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                            self.wfile.flush()

                    data = path.read_bytes()
                    if "tailLines" in q:
                        lines = data.splitlines(keepends=True)
                        data = b"".join(lines[-int(q["tailLines"][0]) :]) if int(q["tailLines"][0]) else b""
                    chunk(data)
                    if q.get("follow", ["false"])[0] == "true":
                        offset = path.stat().st_size
                        with open(path, "rb") as f:
                            f.seek(offset)
                            while True:
                                more = f.read(65536)
                                if more:
                                    chunk(more)
                                    continue
                                with agent.lock:
                                    alive = pod.uid in agent.pods and pod.phase not in ("Succeeded", "Failed")
                                if not alive:
                                    chunk(f.read())
                                    break
                                time.sleep(0.5)
                    self.wfile.write(b"0\r\n\r\n")

            server = ThreadingHTTPServer(("127.0.0.1", int(n["kubeletPort"])), Handler)
            server.daemon_threads = True
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(crt), str(key))
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
            threading.Thread(target=server.serve_forever, daemon=True, name=f"kubelet-{name}").start()

    def loop(self) -> None:
        self.serve_kubelet_api()
        threading.Thread(target=self.proxy.loop, daemon=True, name="service-proxy").start()
        (self.state / "ready").write_text(str(os.getpid()))
        log(
            f"running for nodes {sorted(self.nodes)}; images {sorted(self.images)}; upstream images "
            f"{sorted(self.upstream)}; "
            f"pod network {self.net.cidr} on {self.net.bridge}"
        )
        while not self.stopping:
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - keep the node alive; the error is in the log
                log("sync failed:\n" + traceback.format_exc())
            time.sleep(0.5)
        self.proxy.stopping = True
        with self.lock:
            for p in self.pods.values():
                p.stop(5)
        self.net.close()

    def sync(self) -> None:
        listed = self.core.list_pod_for_all_namespaces(field_selector="spec.nodeName!=").items
        seen = set()
        for obj in listed:
            if obj.spec.node_name not in self.nodes:
                continue
            uid = obj.metadata.uid
            seen.add(uid)
            with self.lock:
                pod = self.pods.get(uid)
            if obj.metadata.deletion_timestamp is not None:
                if pod is not None:
                    grace = min(obj.metadata.deletion_grace_period_seconds or 30, 10)
                    threading.Thread(target=self._delete, args=(pod, grace), daemon=True).start()
                    with self.lock:
                        self.pods.pop(uid, None)
                else:
                    self._force_delete(obj.metadata.namespace, obj.metadata.name, uid)
                continue
            if pod is None:
                if obj.status.phase in ("Succeeded", "Failed"):
                    continue  # finished before this agent started
                pod = Pod(self, obj)
                with self.lock:
                    self.pods[uid] = pod
                log(f"{pod.ns}/{pod.name}: bound to {pod.node}")
            pod.tick()
            pod.report()
        with self.lock:
            gone = [p for uid, p in self.pods.items() if uid not in seen]
            for p in gone:
                self.pods.pop(p.uid, None)
        for p in gone:
            threading.Thread(target=p.stop, args=(2,), daemon=True).start()

    def _delete(self, pod: Pod, grace: float) -> None:
        pod.stop(grace)
        self._force_delete(pod.ns, pod.name, pod.uid)
        shutil.rmtree(pod.dir, ignore_errors=True)

    def _force_delete(self, ns: str, name: str, uid: str) -> None:
        try:
            self.core.delete_namespaced_pod(
                name,
                ns,
                grace_period_seconds=0,
                body=client.V1DeleteOptions(grace_period_seconds=0, preconditions={"uid": uid}),
            )
        except ApiException as err:
            if err.status not in (404, 409):
                log(f"{ns}/{name}: delete failed: {err.status} {err.reason}")


def run(args) -> None:
    agent = Agent(args)

    def stop(*_):
        agent.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent.loop()


# --- inside the pod's namespaces ---------------------------------------------------------------------------------


def in_root(root: Path, path: str) -> Path:
    """`path` inside the container root, following symlinks as the container would (never out of the root)."""
    out = root
    for part in Path(path).parts[1:]:
        nxt = out / part
        hops = 0
        while nxt.is_symlink() and hops < 20:
            link = os.readlink(nxt)
            nxt = in_root(root, link) if link.startswith("/") else (nxt.parent / link)
            hops += 1
        out = nxt
    return out


def exec_container(launch_file: str) -> None:
    """Runs in the new mount/UTS(/net) namespaces that `unshare` made: build the container's root, then exec."""
    spec = json.loads(Path(launch_file).read_text())
    d = Path(spec["dir"])
    root, upper, work = d / "root", d / "upper", d / "work"
    for p in (root, upper, work):
        p.mkdir(parents=True, exist_ok=True)

    def sh(*cmd: str) -> None:
        subprocess.run(cmd, check=True)

    socket.sethostname(spec["hostname"])
    sh("mount", "-t", "overlay", "overlay", "-o", f"lowerdir=/,upperdir={upper},workdir={work}", str(root))
    for sub in ("dev", "proc", "sys"):
        sh("mount", "--rbind", f"/{sub}", str(root / sub))
    # The pod's private /tmp would hide a virtual environment or repository that lives under /tmp (a CI clone): keep
    # the overlay's view of those (still copy-on-write) and put it back over the private /tmp.
    kept = []
    for i, p in enumerate(sorted({hp for hp in spec.get("hostPaths", []) if Path(hp).is_relative_to("/tmp")})):
        stage = d / f"keep-{i}"
        stage.mkdir(exist_ok=True)
        sh("mount", "--bind", str(root / Path(p).relative_to("/")), str(stage))
        kept.append((stage, p))
    sh("mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", str(root / "tmp"))
    (root / "etc" / "hostname").write_text(spec["hostname"] + "\n")
    hosts = (root / "etc" / "hosts").read_text() if (root / "etc" / "hosts").exists() else ""
    extra = [f"{spec.get('podIP', '127.0.0.1')}\t{spec['hostname']}", *spec.get("hosts", [])]
    (root / "etc" / "hosts").write_text(hosts + "".join(line + "\n" for line in extra))
    # What an upstream image's layers create (images.yaml: users, groups, dirs), in this pod's root only.
    prep = spec.get("prepare") or {}
    for fname, key in (("passwd", "users"), ("group", "groups")):
        entries = prep.get(key) or []
        if entries:
            f = root / "etc" / fname
            taken = {e.split(":")[0] for e in entries} | {e.split(":")[2] for e in entries}
            kept_lines = [
                ln
                for ln in f.read_text().splitlines()
                if ln.split(":")[0] not in taken and (ln.split(":") + ["", "", ""])[2] not in taken
            ]
            f.write_text("\n".join(kept_lines + entries) + "\n")
    for path, d in (prep.get("dirs") or {}).items():
        target = in_root(root, path)
        target.mkdir(parents=True, exist_ok=True)
        owner, _, grp = str(d.get("owner", "0:0")).partition(":")
        os.chown(target, int(owner), int(grp or owner))
        os.chmod(target, int(str(d.get("mode", "755")), 8))
    for m in spec["mounts"]:
        target = in_root(root, m["target"])
        if Path(m["source"]).is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        if spec.get("fsGroup") is not None and Path(m["source"]).is_dir() and not m["readOnly"]:
            os.chown(m["source"], -1, int(spec["fsGroup"]))
            os.chmod(m["source"], 0o2775)
        sh("mount", "--bind", m["source"], str(target))
        if m["readOnly"]:
            sh("mount", "-o", "remount,bind,ro", str(target))
    for stage, p in kept:  # after the pod's volumes, one of which may be mounted at /tmp
        target = root / Path(p).relative_to("/")
        target.mkdir(parents=True, exist_ok=True)
        sh("mount", "--move", str(stage), str(target))
    workdir = in_root(root, spec["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    home = in_root(root, spec["home"])
    if not home.exists():
        home.mkdir(parents=True, exist_ok=True)
    if spec["user"] is not None:
        for p in (workdir, home):
            os.chown(p, int(spec["user"]), int(spec["group"] or spec["user"]))
        # In the images the interpreter and its packages are readable by the image's user (/opt/venv); here they are
        # the host's, possibly under a private directory such as /root/.pyenv. Open the path to them in this pod's
        # copy-on-write root only (the host is not changed).
        for target in {
            os.path.realpath(sys.executable),
            sys.prefix,
            os.path.realpath(spec["env"]["PATH"].split(":")[0]),
        }:
            parts = Path(target).parts
            for i in range(2, len(parts) + 1):
                d = in_root(root, str(Path(*parts[:i])))
                if d.is_dir() and not os.stat(d).st_mode & 0o001:
                    os.chmod(d, os.stat(d).st_mode | 0o005)
    if spec["net"]:
        sh("ip", "link", "set", "lo", "up")
    if spec["readOnlyRoot"]:
        sh("mount", "-o", "remount,ro", str(root))
    os.chroot(root)
    os.chdir(spec["workdir"])
    env = dict(spec["env"])
    env.setdefault("HOME", spec["home"])
    if spec["user"] is not None:
        groups = [int(spec["fsGroup"])] if spec.get("fsGroup") is not None else []
        os.setgroups(groups)
        os.setgid(int(spec["group"] or spec["user"]))
        os.setuid(int(spec["user"]))
    argv = spec["argv"]
    exe = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=env.get("PATH"))
    if exe is None:
        print(f"node agent: exec: {argv[0]!r}: executable file not found in $PATH", file=sys.stderr, flush=True)
        os._exit(127)
    os.execve(exe, argv, env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("register", "run"):
        p = sub.add_parser(name)
        p.add_argument("--nodes", required=True)
        p.add_argument("--kubeconfig", required=True)
        p.add_argument("--context", required=True)
        if name == "run":
            p.add_argument("--state", required=True)
            p.add_argument("--venv", required=True)
            p.add_argument("--repo", required=True)
            p.add_argument("--api-host", required=True)
            p.add_argument("--api-port", type=int, required=True)
            p.add_argument("--ca", required=True)
            p.add_argument("--pod-cidr", default="10.244.0.0/24", help="the pod network (a /24; its .1 is the bridge)")
            p.add_argument("--bridge", default="tapper-br0", help="the pod network's bridge on this machine")
    e = sub.add_parser("exec")
    e.add_argument("launch")
    args = ap.parse_args()
    if args.cmd == "register":
        register(args)
    elif args.cmd == "run":
        run(args)
    else:
        exec_container(args.launch)


if __name__ == "__main__":
    main()
