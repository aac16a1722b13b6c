"""Real Ray clusters and a real S3 server on loopback for the tests: every process is started by
us, on 127.0.0.1, on ports found free, and stopped by pid in teardown (never `ray stop`, which
would kill every Ray on the machine)."""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _kill_tree(procs: list[psutil.Process]) -> None:
    everything = []
    for p in procs:
        try:
            everything += [p] + p.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for p in everything:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(everything, timeout=10)


class RayCluster:
    """A head node (with dashboard, for `ray job submit`) and optional worker nodes, each a
    `ray start --block` process in its own process group."""

    def __init__(self, env: dict[str, str], head_cpus: int = 4, head_resources: dict | None = None):
        # Token authentication, as Ray >= 2.59 does for local clusters: every node and every client
        # (ray CLI, job submission, drivers) gets the same token through the environment.
        self.env = dict(env, PATH=f"{BIN}:{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
                        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
        self.gcs_port, self.dashboard_port, self.client_port = free_ports(3)
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: unix socket paths
        self.nodes: list[subprocess.Popen] = []
        try:
            self._start(["--head", f"--port={self.gcs_port}", "--include-dashboard=true",
                         "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                         f"--ray-client-server-port={self.client_port}", f"--temp-dir={self.temp_dir}"],
                        head_cpus, head_resources or {})
            wait_for_port(self.gcs_port, 60)
            wait_for_port(self.dashboard_port, 90)
            self.wait_nodes(1)
        except BaseException:
            self.stop()
            raise

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, extra: list[str], cpus: int, resources: dict) -> None:
        agent, grpc, runtime_env, metrics = free_ports(4)
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
               f"--resources={json.dumps(resources)}", "--disable-usage-stats", "--min-worker-port=0",
               "--max-worker-port=0", f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={grpc}", f"--runtime-env-agent-port={runtime_env}",
               f"--metrics-export-port={metrics}", "--object-store-memory=300000000", *extra]
        self.nodes.append(subprocess.Popen(cmd, env=self.env, start_new_session=True,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def add_node(self, cpus: int, resources: dict) -> None:
        self._start([f"--address={self.address}"], cpus, resources)
        try:
            self.wait_nodes(len(self.nodes))
        except BaseException:
            self.stop()
            raise

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in self.nodes:
                if p.poll() is not None:
                    raise RuntimeError(f"a ray node exited with {p.returncode}")
            out = subprocess.run([str(BIN / "ray"), "status", f"--address={self.address}"], env=self.env,
                                 capture_output=True, text=True, timeout=60)
            if out.returncode == 0 and out.stdout.count("node_") >= n:
                return
            time.sleep(1)
        raise TimeoutError(f"{n} Ray node(s) not up after {timeout}s")

    def ray_cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def stop(self) -> None:
        for p in self.nodes:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.nodes:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        _kill_tree(self._ours())  # whatever outlived its node: workers, engine processes

    def _ours(self) -> list[psutil.Process]:
        """Processes of this cluster, found by our GCS address or temp dir in their command line."""
        marks = (f"127.0.0.1:{self.gcs_port}", self.temp_dir)
        return [p for p in psutil.process_iter(["cmdline"])
                if any(m in " ".join(p.info["cmdline"] or []) for m in marks)]

    def leftovers(self) -> list[int]:
        return [p.pid for p in self._ours()]


class S3Server:
    """moto_server on 127.0.0.1 (a real S3 API over HTTP), with test credentials."""
    REGION = "us-west-2"  # moto refuses us-east-1's location constraint on bucket creation

    def __init__(self):
        (self.port,) = free_ports(1)
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": self.REGION}
        self.proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     env=dict(os.environ, **self.env), start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, 30)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict:
        return {"client_kwargs": {"endpoint_url": self.endpoint, "region_name": self.REGION}}

    def fs(self):
        import s3fs
        return s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs=self.storage_options["client_kwargs"],
                                 skip_instance_cache=True)

    def make_bucket(self, name: str) -> None:
        self.fs().mkdir(name, create_parents=True, region_name=self.REGION)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
