"""A tiny fault-injecting HTTP proxy on 127.0.0.1, in front of the GCS emulator.

    with FaultProxy(upstream="127.0.0.1:PORT") as proxy:   # proxy.host -> STORAGE_EMULATOR_HOST
        proxy.fail("00003.tar", times=2, status=503)      # the next 2 requests naming it get a 503
        proxy.delay("00005.tar", times=1, seconds=2.0)    # the next one waits 2 s first

Rules match a substring of the request path (object names appear URL-encoded in both the
metadata and the media URLs). Everything else is forwarded unchanged. Bounded: a fault fires
only `times` times, delays are capped, and the server thread stops with the context.
"""

from __future__ import annotations

import collections
import http.client
import http.server
import threading
import time
import urllib.parse


class FaultProxy:
    def __init__(self, upstream: str):
        self.upstream = upstream.split("://", 1)[-1]
        self._lock = threading.Lock()
        self._rules: list = []  # [substring, remaining, status or None, delay seconds]
        self.injected = collections.Counter()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                status, delay = proxy._fault(urllib.parse.unquote(self.path))
                if delay:
                    time.sleep(min(delay, 5.0))
                if status:
                    payload = b'{"error": {"code": %d, "message": "injected"}}' % status
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                connection = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                connection.close()

            def handle(self):  # a client that gave up (timed out) is not an error here
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _fault(self, path: str):
        with self._lock:
            for rule in self._rules:
                if rule[0] in path and rule[1] > 0:
                    rule[1] -= 1
                    self.injected[rule[0]] += 1
                    return rule[2], rule[3]
        return None, 0.0

    def fail(self, name: str, *, times: int, status: int = 503) -> None:
        with self._lock:
            self._rules.append([name, times, status, 0.0])

    def delay(self, name: str, *, times: int, seconds: float) -> None:
        with self._lock:
            self._rules.append([name, times, None, seconds])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
