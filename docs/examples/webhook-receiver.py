"""A webhook receiver to try `tether notify` with: prints each message and checks its signature.

    python3 docs/examples/webhook-receiver.py 9200 hook.secret   # port, then the secret file (optional)

It answers 204 to a message it accepts and 401 to one whose signature is wrong or stale (the
controller then retries it, and `tether notify log` shows the error). Python's standard library
only; a starting point for a real receiver (docs/notifications.md: the body, the headers).
"""

import hashlib
import hmac
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 9200
SECRET = open(sys.argv[2]).read().rstrip("\r\n").encode() if len(sys.argv) > 2 else None  # noqa: SIM115


def verify(secret: bytes, headers, body: bytes) -> bool:
    """docs/notifications.md's check: HMAC-SHA256 of the timestamp, a dot and the raw body."""
    timestamp = headers.get("X-Tether-Timestamp", "0")
    expected = "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    fresh = abs(time.time() - int(timestamp)) < 300  # refuse replays of old messages
    return fresh and hmac.compare_digest(expected, headers.get("X-Tether-Signature", ""))


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        ok = SECRET is None or verify(SECRET, self.headers, body)
        message = json.loads(body) if ok else {}
        checked = "unsigned" if SECRET is None else "signature ok" if ok else "BAD SIGNATURE: refused"
        print(
            f"delivery {self.headers.get('X-Tether-Delivery')} {self.headers.get('X-Tether-Event')}: "
            f"{message.get('text', '')} ({checked})",
            flush=True,
        )
        self.send_response(204 if ok else 401)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass  # one line per message (above), not http.server's access log


print(f"listening on http://127.0.0.1:{PORT}/hook", flush=True)
ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
