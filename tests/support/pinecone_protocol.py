"""A local HTTP server speaking the Pinecone data-plane protocol the official SDK uses.

No Pinecone server can run here, so this is a protocol test double: it checks what the SDK
sends (path, Api-Key header, JSON bodies, Pinecone's documented limits) and answers as the
service does, including throttling (429) and oversized requests (413). Search is an exact
sparse dot product over what was upserted.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Store keys reach Ray workers the way they do on a cluster: in the nodes' environment (see conftest).
PINECONE_TEST_KEY = "pinecone-test-key"
MAX_BODY = 2 * 1024 * 1024  # 2 MB per request
MAX_VECTORS = 1000
MAX_SPARSE = 2048
MAX_METADATA = 40 * 1024


class PineconeProtocolServer:
    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.namespaces: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        self.throttle_next = 0  # answer this many upserts with 429 first
        self.max_body = MAX_BODY
        self.requests: list[tuple[str, int, int]] = []  # (path, body bytes, status)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, payload = server.handle(self.path, self.headers, body)
                with server.lock:
                    server.requests.append((self.path, len(body), status))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()

    def handle(self, path: str, headers: Any, body: bytes) -> tuple[int, dict]:
        if headers.get("Api-Key") != self.api_key:
            return 401, {"code": 16, "message": "Invalid API Key"}
        if len(body) > self.max_body:
            return 413, {
                "code": 3,
                "message": f"Request size {len(body)} exceeds the maximum supported size of {self.max_body}",
            }
        request = json.loads(body or b"{}")
        if path == "/vectors/upsert":
            return self._upsert(request)
        if path == "/query":
            return self._query(request)
        if path == "/vectors/delete":
            with self.lock:
                for i in request["ids"]:
                    self.namespaces[request.get("namespace", "")].pop(i, None)
            return 200, {}
        if path == "/describe_index_stats":
            with self.lock:
                spaces = {ns: {"vectorCount": len(v)} for ns, v in self.namespaces.items()}
            return 200, {
                "namespaces": spaces,
                "dimension": 0,
                "totalVectorCount": sum(s["vectorCount"] for s in spaces.values()),
            }
        return 404, {"message": f"unknown path {path}"}

    def _upsert(self, request: dict) -> tuple[int, dict]:
        with self.lock:
            if self.throttle_next > 0:
                self.throttle_next -= 1
                return 429, {"code": 8, "message": "Too Many Requests"}
        vectors = request["vectors"]
        if len(vectors) > MAX_VECTORS:
            return 400, {"code": 3, "message": f"{len(vectors)} vectors in one upsert; the limit is {MAX_VECTORS}"}
        for v in vectors:
            sparse = v.get("sparseValues") or {}
            if not sparse.get("indices"):
                return 400, {"code": 3, "message": f"vector {v['id']}: sparse vector must contain at least one value"}
            if len(sparse["indices"]) > MAX_SPARSE or len(sparse["indices"]) != len(sparse["values"]):
                return 400, {
                    "code": 3,
                    "message": f"vector {v['id']}: at most {MAX_SPARSE} non-zeros, indices and values alike",
                }
            if len(v["id"]) > 512 or not v["id"].isascii():
                return 400, {"code": 3, "message": f"id {v['id'][:40]!r}: ids are at most 512 ASCII characters"}
            if len(json.dumps(v.get("metadata", {}))) > MAX_METADATA:
                return 400, {"code": 3, "message": f"vector {v['id']}: metadata over 40 KB"}
        with self.lock:
            space = self.namespaces[request.get("namespace", "")]
            for v in vectors:
                space[v["id"]] = v
        return 200, {"upsertedCount": len(vectors)}

    def _query(self, request: dict) -> tuple[int, dict]:
        query = dict(zip(request["sparseVector"]["indices"], request["sparseVector"]["values"]))
        with self.lock:
            space = list(self.namespaces[request.get("namespace", "")].values())
        scored = []
        for v in space:
            s = v["sparseValues"]
            score = sum(query.get(i, 0.0) * w for i, w in zip(s["indices"], s["values"]))
            scored.append({"id": v["id"], "score": score, "metadata": v.get("metadata", {})})
        scored.sort(key=lambda m: -m["score"])
        return 200, {"matches": scored[: request["topK"]], "namespace": request.get("namespace", "")}
