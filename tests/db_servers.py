"""Throwaway database servers for the tests: PostgreSQL (initdb/pg_ctl) and MariaDB, on free loopback ports.

Each lives in a fresh folder and is stopped (and removed) when its context
ends. Run as root, the servers run as the `postgres` user and with
`--user=root` (MariaDB) respectively, as their tools require.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator


PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def postgres_available() -> bool:
    return (PG_BIN / "initdb").exists()


def mariadb_available() -> bool:
    return shutil.which("mariadbd") is not None and shutil.which("mariadb-install-db") is not None


class PostgresServer:
    def __init__(self, folder: Path, port: int, database: str) -> None:
        self.folder, self.port, self.data = folder, port, folder / "data"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}"

    def _ctl(self, *args: str) -> None:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args]), check=True, capture_output=True)

    def start(self) -> None:
        self._ctl("-l", str(self.folder / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        self._ctl("-m", "immediate", "-w", "stop")


@contextlib.contextmanager
def postgres_server(database: str = "chatllm") -> Iterator[PostgresServer]:
    folder = Path(tempfile.mkdtemp(prefix="chatllm-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    server = PostgresServer(folder, free_port(), database)
    try:
        subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(server.data), "-U", "postgres", "--auth=trust",
                                     "--no-sync", "-E", "UTF8", "--locale=C"]), check=True, capture_output=True)
        server.start()
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{database}"')
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def mariadb_server(database: str = "chatllm") -> Iterator[str]:
    folder = Path(tempfile.mkdtemp(prefix="chatllm-maria-", dir="/tmp"))
    data, sock = folder / "data", folder / "mysqld.sock"
    port = free_port()
    user = ["--user=root"] if os.geteuid() == 0 else []
    process = None
    try:
        subprocess.run(["mariadb-install-db", f"--datadir={data}", "--auth-root-authentication-method=normal",
                        "--skip-test-db", *user], check=True, capture_output=True)
        process = subprocess.Popen(["mariadbd", "--no-defaults", f"--datadir={data}", f"--port={port}",
                                    "--bind-address=127.0.0.1", f"--socket={sock}", f"--pid-file={folder / 'pid'}",
                                    "--skip-grant-tables", "--innodb-flush-log-at-trx-commit=0",
                                    "--character-set-server=utf8mb4", *user],
                                   stdout=subprocess.DEVNULL, stderr=(folder / "log").open("wb"))
        import pymysql

        deadline = time.monotonic() + 60
        while True:
            try:
                connection = pymysql.connect(host="127.0.0.1", port=port, user="root")
                break
            except pymysql.err.OperationalError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("MariaDB did not start: " + (folder / "log").read_text()[-2000:]) from None
                time.sleep(0.2)
        with connection, connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4")
        yield f"mysql+pymysql://root@127.0.0.1:{port}/{database}?charset=utf8mb4"
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(folder, ignore_errors=True)
