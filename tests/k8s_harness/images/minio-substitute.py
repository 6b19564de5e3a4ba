"""The node agent's substitute for the MinIO image (images.yaml, `upstream:`): moto's S3 server, which speaks the
same S3 API, behind MinIO's command line, credentials variables and health endpoints.

    minio server DIR [--address [HOST]:PORT] [--console-address ...]

What is MinIO's contract here: the `server DIR` arguments (DIR must be a writable directory), the listening address
(default :9000), MINIO_ROOT_USER / MINIO_ROOT_PASSWORD required (at least 3 and 8 characters, as MinIO checks),
path-style bucket addressing (MinIO's default without MINIO_DOMAIN), and GET/HEAD /minio/health/live and
/minio/health/ready answering 200 while the server runs. What is not: moto keeps objects in memory, not in DIR
(they do not survive a restart of the container); moto does not check request signatures, so any credentials are
accepted, the root ones included; no console, erasure coding, IAM or bucket policies.
"""

from __future__ import annotations

import os
import signal
import sys

os.environ.setdefault("S3_IGNORE_SUBDOMAIN_BUCKETNAME", "true")  # path-style buckets, as MinIO without MINIO_DOMAIN

from moto.server import DomainDispatcherApplication, create_backend_app  # noqa: E402
from werkzeug.serving import run_simple  # noqa: E402

HEALTH = {"/minio/health/live", "/minio/health/ready", "/minio/health/cluster"}


def fail(msg: str) -> None:
    print(f"ERROR {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def parse(argv: list[str]) -> tuple[str, str, int]:
    if argv[:1] == ["minio"]:  # the image's docker-entrypoint.sh takes `minio server ...` and `server ...` alike
        argv = argv[1:]
    if argv[:1] != ["server"]:
        fail(f"minio substitute: only `server` is supported, got {argv!r}")
    address, dirs, rest = ":9000", [], argv[1:]
    while rest:
        a = rest.pop(0)
        if a.startswith("--address"):
            address = a.split("=", 1)[1] if "=" in a else rest.pop(0)
        elif a.startswith("--console-address") or a.startswith("--certs-dir"):
            if "=" not in a:
                rest.pop(0)
        elif a.startswith("-"):
            fail(f"minio substitute: unsupported flag {a}")
        else:
            dirs.append(a)
    if len(dirs) != 1:
        fail(f"minio substitute: exactly one DIR expected, got {dirs!r}")
    host, _, port = address.rpartition(":")
    return dirs[0], host or "0.0.0.0", int(port)


def main() -> None:
    data, host, port = parse(sys.argv[1:])
    user, password = os.environ.get("MINIO_ROOT_USER", ""), os.environ.get("MINIO_ROOT_PASSWORD", "")
    if len(user) < 3:
        fail("Invalid credentials: MINIO_ROOT_USER length should be at least 3")
    if len(password) < 8:
        fail("Invalid credentials: MINIO_ROOT_PASSWORD length should be at least 8")
    if not os.path.isdir(data) or not os.access(data, os.W_OK):
        fail(f"Unable to use the drive {data}: not a writable directory")
    s3 = DomainDispatcherApplication(create_backend_app)  # as `moto_server`: S3 from the requests' signing scope

    def app(environ, start_response):
        if environ.get("PATH_INFO") in HEALTH and environ.get("REQUEST_METHOD") in ("GET", "HEAD"):
            start_response("200 OK", [("Content-Length", "0")])
            return [b""]
        return s3(environ, start_response)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(
        f"minio substitute (moto {__import__('moto').__version__} S3 server): API http://{host}:{port}, drive {data} "
        "(objects held in memory)",
        flush=True,
    )
    run_simple(host, port, app, threaded=True)


if __name__ == "__main__":
    main()
