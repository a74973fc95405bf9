"""A real multi-process Ray cluster on this machine for tests: `ray start` nodes on loopback only.

    with LocalCluster(num_cpus=2, env={"OMP_NUM_THREADS": "1"}) as cluster:
        cluster.dashboard_url              # http://127.0.0.1:PORT, for the Jobs API
        cluster.address                    # 127.0.0.1:PORT, the GCS, for ray.init / ray start
        cluster.client_env()               # environment of a client process: the cluster's token
        cluster.resources()                # ray.cluster_resources(), from a client process
        worker = cluster.add_worker(num_cpus=1, resources={"apple_silicon": 1})
        cluster.kill_node(worker)          # SIGKILL that node's processes: a lost machine
    # every process the cluster started is gone here

Other engineers run their own Rays on the same machine, so a cluster here
- lives in its own short temp dir (`--temp-dir`: Unix sockets, logs, and the `ray_current_cluster`
  file that `ray.init("auto")` reads, so nobody else's Ray finds this one);
- takes every port from the free ones (Ray's defaults 6379, 8265, 10001, 44217, 44227 ... would clash);
- binds nothing but 127.0.0.1: Ray servers listen on loopback only when the node IP is exactly
  127.0.0.1 (any other, 127.0.0.2 included, and the GCS, raylet and agents listen on every
  interface), yet `ray start` swaps 127.0.0.1 for the host's outward IP
  (services.resolve_ip_for_localhost). The head keeps it with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
  like orchestration/cluster/ray_session.py; that switch also makes `ray start --address` refuse to join,
  so a worker node's `ray start` runs with Ray's IP lookup answering 127.0.0.1 (RAY_WORKER below).
  `listeners()` lets a test check it;
- is stopped by killing its own processes (`pids()`), never with `ray stop`.

Token authentication is on, as on a real cluster (Ray >= 2.59 turns it on when a token exists): a
token is written to ROOT/auth_token; every node runs with RAY_AUTH_MODE=token (a joining node
without it is refused: InvalidAuthToken) and reads the token through RAY_AUTH_TOKEN_PATH.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "HANYEONG_TEST_RAY_NODE"  # in every node's environment: "<cluster root>|<node name>"
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # `ray` of this interpreter's environment
RAY_WORKER = [sys.executable, "-c", "import sys, ray._private.services as s; "
              "s.get_node_ip_address = lambda address=None: '127.0.0.1'; "
              "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"]  # fmt: skip


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 right now (held open together, so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Node:
    name: str
    ports: dict[str, int] = field(default_factory=dict)


class LocalCluster:
    """A head, and worker nodes on demand, started with `ray start` in a fresh temp dir (module doc)."""

    def __init__(self, num_cpus: int = 2, resources: dict | None = None, env: dict | None = None,
                 auth: bool = True):  # fmt: skip
        self.root = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Unix socket paths <= 107 bytes
        self.num_cpus, self.head_resources, self.auth = num_cpus, resources, auth
        self.extra_env = dict(env or {})
        self.nodes: list[Node] = []
        self.address = self.dashboard_url = ""
        self.token_path = self.root / "auth_token"

    def __enter__(self) -> LocalCluster:
        try:
            self.start_head()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- nodes -----------------------------------------------------------------------------------

    def start_head(self) -> Node:
        gcs, dashboard, client, autoscaler_metrics, dashboard_metrics = free_ports(5)
        if self.auth:
            self.token_path.write_text(secrets.token_hex(32))
        node = Node("head", {"gcs": gcs, "dashboard": dashboard, "client": client,
                             "autoscaler_metrics": autoscaler_metrics, "dashboard_metrics": dashboard_metrics})  # fmt: skip
        # the head's two fixed-port metrics servers read their port from these variables
        env = {"AUTOSCALER_METRIC_PORT": str(autoscaler_metrics), "DASHBOARD_METRIC_PORT": str(dashboard_metrics)}
        args = ["--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                "--include-dashboard", "true", "--ray-client-server-port", str(client)]  # fmt: skip
        self._ray_start(RAY, node, args, env, self.num_cpus, self.head_resources)
        self.address, self.dashboard_url = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
        return node

    def add_worker(self, num_cpus: int = 1, resources: dict | None = None, num_gpus: int | None = None) -> Node:
        """Join one more node (`ray start --address`) with its own CPUs and custom resources."""
        if not self.address:
            raise RuntimeError("start the head first")
        node = Node(f"worker{len(self.nodes)}")
        args = ["--address", self.address] + (["--num-gpus", str(num_gpus)] if num_gpus is not None else [])
        self._ray_start(RAY_WORKER, node, args, {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}, num_cpus, resources)
        return node

    def kill_node(self, node: Node, sig: int = signal.SIGKILL) -> list[int]:
        """Send `sig` to every process of one node (raylet, agents, workers); returns their pids."""
        pids = self.pids(node)
        _signal(pids, sig)
        return pids

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every process of the cluster, SIGKILL what is left after `grace_s`, remove ROOT."""
        pids = self.pids()
        _signal(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = [p for p in pids if _alive(p)]
        for _ in range(50):  # and whatever one of them started meanwhile
            pids = [p for p in self.pids() if _alive(p)]
            if not pids:
                break
            _signal(pids, signal.SIGKILL)
            time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- looking at it ---------------------------------------------------------------------------

    def pids(self, node: Node | None = None) -> list[int]:
        """Processes of the cluster, or of one node, with all their descendants.

        A process is the cluster's when its environment has the marker, or its command line, working
        directory or an open file lies under ROOT (Ray's setproctitle, as in ray::DashboardAgent or
        ray::IDLE, can blank /proc/PID/environ; every Ray process keeps its logs under ROOT open).
        A node's are those with its marker, or whose command line names its node-manager port (its
        raylet), and their descendants (the raylet starts the agents and workers; a job's driver is
        a worker's child)."""
        table = _processes()
        root = str(self.root)
        if node is None:
            marker = f"\0{MARKER}={root}|".encode()
            seeds = {pid for pid, p in table.items()
                     if marker in p.environ or root in p.cmdline or any(f.startswith(root) for f in p.files)}  # fmt: skip
        else:
            marker = f"\0{MARKER}={root}|{node.name}\0".encode()
            raylet = f"--node_manager_port={node.ports['node_manager']} "
            seeds = {pid for pid, p in table.items() if marker in p.environ or (root in p.cmdline and raylet in p.cmdline)}
        seeds -= {os.getpid(), os.getppid()}  # this test process may have read a log under ROOT
        return sorted(_with_descendants(seeds, table) - {os.getpid()})

    def listeners(self) -> list[tuple[str, int]]:
        """(local address, pid) of every listening TCP socket of the cluster's processes (`ss -ltnp`)."""
        pids = set(self.pids())
        out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
        found = []
        for line in out.splitlines():
            for item in line.split("pid=")[1:]:
                pid = int(item.split(",")[0])
                if pid in pids:
                    found.append((line.split()[3], pid))
        return found

    def client_env(self, base: dict | None = None) -> dict:
        """Environment for a client process of this cluster (the CLI, ray.init(address), `ray
        status`): its token (and RAY_AUTH_MODE=token, without which ray.init(address) sends none),
        no other Ray's address, and 127.0.0.1 kept as it is (else ray.init(address) swaps it for
        the outward IP, where nothing listens)."""
        env = dict(os.environ if base is None else base)
        for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
            env.pop(key, None)
        if self.auth:
            env["RAY_AUTH_TOKEN_PATH"], env["RAY_AUTH_MODE"] = str(self.token_path), "token"
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        return env

    def resources(self) -> dict:
        """ray.cluster_resources() of the live nodes, asked from a separate client process."""
        probe = "import json, ray; ray.init(address=%r, logging_level='ERROR'); print(json.dumps(ray.cluster_resources()))"
        done = subprocess.run([sys.executable, "-c", probe % self.address], env=self.client_env(), capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"ray.init({self.address!r}) failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def logs(self) -> Path:
        return self.root / "ray" / "session_latest" / "logs"

    # ---- inside ----------------------------------------------------------------------------------

    def _ray_start(self, ray: list[str], node: Node, args: list[str], env: dict, num_cpus: int,
                   resources: dict | None) -> None:  # fmt: skip
        names = ["node_manager", "object_manager", "agent_listen", "agent_grpc", "runtime_env_agent", "metrics"]
        node.ports.update(zip(names, free_ports(len(names))))
        low, high = self._worker_port_range(list(node.ports.values()))
        command = [*ray, "start", *args, "--node-ip-address", "127.0.0.1", "--temp-dir", str(self.root / "ray"),
                   "--num-cpus", str(num_cpus), "--disable-usage-stats",
                   "--node-manager-port", str(node.ports["node_manager"]),
                   "--object-manager-port", str(node.ports["object_manager"]),
                   "--dashboard-agent-listen-port", str(node.ports["agent_listen"]),
                   "--dashboard-agent-grpc-port", str(node.ports["agent_grpc"]),
                   "--runtime-env-agent-port", str(node.ports["runtime_env_agent"]),
                   "--metrics-export-port", str(node.ports["metrics"]),
                   "--min-worker-port", str(low), "--max-worker-port", str(high),
                   "--log-style", "record", "--log-color", "false"]  # fmt: skip
        if resources:
            command += ["--resources", json.dumps(resources)]
        self.nodes.append(node)
        done = subprocess.run(command, env={**self._node_env(node), **env}, capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"`ray start` of {node.name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    def _node_env(self, node: Node) -> dict:
        env = self.client_env()
        env.update(self.extra_env)
        env[MARKER] = f"{self.root}|{node.name}"
        # `python` in a job's entrypoint is the cluster's: the one of this interpreter's environment
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["RAY_AUTH_MODE"] = "token" if self.auth else "disabled"
        return env

    def _worker_port_range(self, taken: list[int], size: int = 100) -> tuple[int, int]:
        """Ports for the node's worker processes: clear of every port chosen for the cluster (Ray
        refuses overlaps), from a port free now (ephemeral ports are handed out at random, so the
        ones above it are mostly free too)."""
        taken = taken + [port for n in self.nodes for port in n.ports.values()]
        for base in free_ports(20):
            base = min(base, 65535 - size)
            if not any(base <= port <= base + size for port in taken):
                return base, base + size
        raise RuntimeError("no free range of ports for Ray's workers")


@dataclass
class _Process:
    ppid: int
    cmdline: str
    environ: bytes
    files: list[str]


def _processes() -> dict[int, _Process]:
    """Every process we may read: parent, command line, environment (NUL-framed), cwd and open files."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        base = f"/proc/{entry.name}"
        try:
            with open(f"{base}/stat") as f:
                ppid = int(f.read().rsplit(") ", 1)[1].split()[1])
            with open(f"{base}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"{base}/environ", "rb") as f:
                environ = b"\0" + f.read() + b"\0"
            files = [os.readlink(f"{base}/cwd")]
            for fd in os.scandir(f"{base}/fd"):
                try:
                    files.append(os.readlink(fd.path))
                except OSError:
                    pass
        except (OSError, IndexError, ValueError):  # gone, or not ours to read
            continue
        table[int(entry.name)] = _Process(ppid, cmdline, environ, files)
    return table


def _with_descendants(seeds: set[int], table: dict[int, _Process]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, p in table.items():
        children.setdefault(p.ppid, []).append(pid)
    found, todo = set(), list(seeds)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"  # a zombie is gone, only not reaped yet
    except (OSError, IndexError):
        return False
