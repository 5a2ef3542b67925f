"""A local HTTP server speaking the Pinecone data-plane protocol the official SDK uses.

No Pinecone server can run here, so this is a protocol test double: it checks what the SDK
sends (path, Api-Key header, JSON bodies, Pinecone's documented limits) and answers as the
service does, including throttling (429) and oversized requests (413). Search is an exact
sparse dot product over what was upserted.
"""

from __future__ import annotations

import base64
import json
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

# Store keys reach Ray workers the way they do on a cluster: in the nodes' environment (see conftest).
PINECONE_TEST_KEY = "pinecone-test-key"
MAX_BODY = 2 * 1024 * 1024  # 2 MB per request
MAX_VECTORS = 1000
LIST_LIMIT = 100
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
                self.answer(self.path, len(body), *server.handle(self.path, self.headers, body))

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                url = urlsplit(self.path)
                self.answer(url.path, 0, *server.read(url.path, self.headers, parse_qs(url.query)))

            def answer(self, path: str, size: int, status: int, payload: dict) -> None:
                with server.lock:
                    server.requests.append((path, size, status))
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

    def read(self, path: str, headers: Any, query: dict[str, list[str]]) -> tuple[int, dict]:
        """``GET /vectors/list`` (ids in order, pages of at most 100, an opaque token) and
        ``GET /vectors/fetch`` (the vectors of the ids the namespace holds, missing ones absent)."""
        if headers.get("Api-Key") != self.api_key:
            return 401, {"code": 16, "message": "Invalid API Key"}
        namespace = query.get("namespace", [""])[0]
        with self.lock:
            space = dict(self.namespaces.get(namespace, {}))
        if path == "/vectors/list":
            limit = int(query.get("limit", ["100"])[0])
            if not 1 <= limit <= LIST_LIMIT:
                return 400, {"code": 3, "message": f"limit must be between 1 and {LIST_LIMIT}"}
            prefix = query.get("prefix", [""])[0]
            after = base64.b64decode(query["paginationToken"][0]).decode() if "paginationToken" in query else None
            ids = sorted(i for i in space if i.startswith(prefix) and (after is None or i > after))
            page = ids[:limit]
            more = len(ids) > limit
            return 200, {
                "vectors": [{"id": i} for i in page],
                "pagination": {"next": base64.b64encode(page[-1].encode()).decode()} if more else None,
                "namespace": namespace,
                "usage": {"readUnits": 1},
            }
        if path == "/vectors/fetch":
            found = {i: space[i] for i in query.get("ids", []) if i in space}
            vectors = {i: {"values": [], **v} for i, v in found.items()}
            return 200, {"vectors": vectors, "namespace": namespace, "usage": {"readUnits": 1}}
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
