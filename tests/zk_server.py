"""A real standalone Apache ZooKeeper server for tests, run from Debian's `zookeeper` package.

Lifecycle:
1. `ZkServer(workdir)` picks a free loopback port and writes `zoo.cfg` (tickTime 500 ms, so
   session timeouts from 1 s to 30 s are allowed; admin server off; `ruok` enabled);
2. `start()` runs `java ... org.apache.zookeeper.server.ZooKeeperServerMain zoo.cfg`, logging to
   `workdir/zookeeper.log`, and waits until the server answers `ruok` with `imok` (RuntimeError
   with the log's tail when it does not);
3. `stop()` (SIGTERM) or `kill()` (SIGKILL) ends it; `restart()` stops and starts it on the same
   port and data directory, so persistent znodes and live sessions survive.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

JAVA_DIR = Path("/usr/share/java")
ZK_JAR = JAVA_DIR / "zookeeper.jar"  # its manifest's Class-Path names the other jars
LOG_BINDING = JAVA_DIR / "slf4j-simple.jar"  # server log lines to stderr (else slf4j is silent)
TICK_MS = 500


def zookeeper_available() -> bool:
    """True when java and Debian's ZooKeeper jars are installed (apt-get install zookeeper)."""
    return shutil.which("java") is not None and ZK_JAR.is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ruok(port: int, timeout_s: float = 1.0) -> bool:
    """True when a ZooKeeper server on 127.0.0.1:`port` answers the `ruok` command."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(b"ruok")
            return s.recv(16) == b"imok"
    except OSError:
        return False


def expire_session(hosts: str, client_id: tuple[int, bytes], timeout_s: float = 5.0) -> None:
    """Ends the ZooKeeper session `client_id` (kazoo's `client.client_id`) as the server would
    on expiry: a second client joins the session and closes it. The first client then learns
    on its next contact that its session expired (kazoo state LOST) and gets a new one."""
    from kazoo.client import KazooClient

    other = KazooClient(hosts=hosts, client_id=client_id)
    other.start(timeout=timeout_s)
    other.stop()
    other.close()


class ZkServer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.hosts = f"127.0.0.1:{self.port}"
        self.log_path = workdir / "zookeeper.log"
        self.config = workdir / "zoo.cfg"
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        self.config.write_text("\n".join([
            f"tickTime={TICK_MS}",
            f"minSessionTimeout={2 * TICK_MS}",
            f"maxSessionTimeout={60 * TICK_MS}",
            f"dataDir={workdir / 'data'}",
            f"clientPort={self.port}",
            "clientPortAddress=127.0.0.1",
            "maxClientCnxns=0",
            "admin.enableServer=false",
            "4lw.commands.whitelist=ruok,srvr,stat",
            "",
        ]))
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, chroot: str = "") -> str:
        """The registry url of this server, e.g. zk://127.0.0.1:PORT/chroot."""
        return f"zk://{self.hosts}{chroot}"

    def start(self, timeout_s: float = 30.0) -> ZkServer:
        if not zookeeper_available():
            raise RuntimeError(f"ZooKeeper is not installed ({ZK_JAR} or java missing); "
                               f"apt-get install zookeeper")
        classpath = ":".join(str(p) for p in (ZK_JAR, LOG_BINDING) if p.is_file())
        cmd = ["java", "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
               "-cp", classpath, "org.apache.zookeeper.server.ZooKeeperServerMain",
               str(self.config)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ruok(self.port):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"ZooKeeper exited with code {self.proc.returncode} while "
                                   f"starting:\n{self.log_tail()}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"ZooKeeper did not answer ruok on port {self.port} within "
                           f"{timeout_s:g} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`; no-op when not running."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
