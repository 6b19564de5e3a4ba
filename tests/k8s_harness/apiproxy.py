"""The API server as the harness's clients reach it: a TLS reverse proxy in front of kube-apiserver v1.20.

Requests for the three translated resources (translate.TRANSLATIONS: batch/v1 cronjobs, policy/v1
poddisruptionbudgets, autoscaling/v2 horizontalpodautoscalers) go to their served version with the body's
apiVersion rewritten, and the responses (objects, lists, watch events) come back in the GA version. Every other
request is relayed byte for byte, streaming (watches, `follow` logs), with the client's own credentials: the API
server still authenticates, authorizes (RBAC) and admits every call.

Not relayed: connection upgrades (exec, attach, port-forward). Discovery is not rewritten, so `kubectl` does not
see the GA versions through here; the harness applies manifests with translate.to_served instead.
"""

from __future__ import annotations

import argparse
import http.client
import json
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from translate import TranslationError, from_served, to_served, translate_path

HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "host",
    "content-length",
}


class Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream: tuple[str, int]
    upstream_ctx: ssl.SSLContext

    def log_message(self, fmt, *args):  # one line per request on stderr (the harness keeps it as a log file)
        sys.stderr.write("%s %s\n" % (self.command, fmt % args))

    def _relay(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        served = translate_path(self.path)
        path = served or self.path
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        if served:
            headers["Accept"] = "application/json"
            if body and self.headers.get("Content-Type", "").startswith("application/json"):
                try:
                    body = json.dumps(to_served(json.loads(body))).encode()
                except TranslationError as err:
                    return self._send_status(422, str(err))
        conn = http.client.HTTPSConnection(*self.upstream, context=self.upstream_ctx, timeout=None)
        try:
            conn.request(self.command, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            watch = served and ("watch=true" in path or "/watch/" in path) and resp.status == 200
            if served and not watch:
                data = resp.read()
                if resp.getheader("Content-Type", "").startswith("application/json") and data:
                    data = json.dumps(from_served(json.loads(data))).encode()
                self._start(resp, length=len(data))
                self.wfile.write(data)
                return
            self._start(resp, length=None if watch else resp.getheader("Content-Length"))
            chunked = watch or resp.getheader("Content-Length") is None
            if watch:  # one JSON event per line
                while line := resp.readline():
                    if line.strip():
                        line = (json.dumps(from_served(json.loads(line))) + "\n").encode()
                    self._write(line, chunked)
            else:
                while chunk := resp.read1(65536):
                    self._write(chunk, chunked)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            conn.close()

    def _start(self, resp, length) -> None:
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP:
                self.send_header(k, v)
        if length is None:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def _write(self, data: bytes, chunked: bool) -> None:
        if chunked:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.wfile.write(data)
        self.wfile.flush()

    def _send_status(self, code: int, message: str) -> None:
        data = json.dumps(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "message": message,
                "reason": "Invalid",
                "code": code,
            }
        ).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _relay


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="host:port")
    ap.add_argument("--upstream", required=True, help="https://host:port of kube-apiserver")
    ap.add_argument("--cert", required=True, help="serving certificate (also the CA to trust upstream)")
    ap.add_argument("--key", required=True)
    args = ap.parse_args()
    up = urlsplit(args.upstream)
    Proxy.upstream = (up.hostname, up.port)
    Proxy.upstream_ctx = ssl.create_default_context(cafile=args.cert)
    host, port = args.listen.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), Proxy)
    server.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(f"apiproxy: https://{args.listen} -> {args.upstream}", file=sys.stderr, flush=True)
    threading.current_thread().name = "apiproxy"
    server.serve_forever()


if __name__ == "__main__":
    main()
