"""Pytest fixtures for tests against a real ZooKeeper (registered in tests/conftest.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.zk_server import ZkServer, zookeeper_available


@pytest.fixture(scope="session")
def zk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZkServer]:
    """One standalone ZooKeeper for the session; skips when it is not installed, unless
    PD_SERVE_REQUIRE_ZK=1 (CI), which turns the skip into a failure. Tests that stop or restart
    it must leave it running; tests keep apart by using their own chroot."""
    if not zookeeper_available():
        reason = ("ZooKeeper is not installed (needs java and /usr/share/java/zookeeper.jar: "
                  "apt-get install zookeeper)")
        if os.environ.get("PD_SERVE_REQUIRE_ZK") == "1":
            pytest.fail(f"{reason}, and PD_SERVE_REQUIRE_ZK=1")
        pytest.skip(reason)
    server = ZkServer(tmp_path_factory.mktemp("zookeeper")).start()
    try:
        yield server
    finally:
        server.stop()
