"""moto's S3 server on loopback, in its own process, as a pytest fixture.

Import the fixture into a test module (``from s3server import s3_endpoint``).
"""

from __future__ import annotations

import pytest


SERVER = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
server.start()
host, port = server.get_host_and_port()
print(f"ENDPOINT http://{host}:{port}", flush=True)
sys.stdin.read()  # serve until the test closes our stdin
server.stop()
"""


@pytest.fixture
def s3_endpoint(monkeypatch):
    """moto's S3 server in its own process.

    In-process (a thread of the test) it would deadlock: deltalake's Rust
    client keeps the GIL while it waits for the server's reply.
    """
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    endpoint = ""
    for line in proc.stdout:  # moto prints a banner first
        if line.startswith("ENDPOINT "):
            endpoint = line.split()[1]
            break
    assert endpoint.startswith("http://127.0.0.1:"), endpoint
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    yield endpoint
    proc.stdin.close()
    proc.wait(timeout=30)
