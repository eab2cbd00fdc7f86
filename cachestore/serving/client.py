"""Clients of ``ckv serve``: one server (:class:`ServerClient`) and the processes of a sharded store
(:class:`ShardRouter`, routing each user to the process that serves its shard).

Routing is done by the client: each serving process (``ckv serve --shards …``, one per GPU) says in
``GET /healthz`` which shards of how many it serves and how it keys user ids; the router checks that the
processes cover every shard exactly once, keys the request's user ids as the store does
(:func:`cachestore.store.user_keys.to_keys`), takes their shard with the store's own function
(:func:`cachestore.store.shards.shard_of`: Spark's ``pmod(murmur3(user_id), N)``), sends each process
its users — concurrently — and puts the replies back in request order. No router process: that would be
one more hop and one more Python event loop per request, the very limit of a serving process
(docs/sharding.md, "Serving across GPUs"). A user sent to the wrong process gets 421 naming its shard.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from collectivekv.cachestore.store.shards import shard_of
from collectivekv.cachestore.store.user_keys import INT, to_keys


class ServingError(RuntimeError):
    """A reply other than 200: its status, and the server's ``field`` and ``error``."""

    def __init__(self, url: str, status: int, body: bytes) -> None:
        try:
            doc = json.loads(body)
        except ValueError:
            doc = {"error": body[:200].decode("latin-1"), "field": None}
        super().__init__(f"{url}: HTTP {status} ({doc.get('field')}): {doc.get('error')}")
        self.status, self.field = status, doc.get("field")


@dataclass(frozen=True)
class Scores:
    """A reply: per user the probabilities of its candidates, the cold-start flag, and the store and model
    versions that scored it (a user's versions are those of the process that served it)."""

    scores: list[list[float]]
    cold_start: list[bool]
    store_versions: list[str]
    model_versions: list[str]


class ServerClient:
    """One serving process over one keep-alive HTTP/1.1 connection (reconnects when the server closed it).
    Not for concurrent use from several threads: give each thread its own."""

    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"expected an http:// URL, got {url!r}")
        self.url = url.rstrip("/")
        self._host, self._port, self._timeout = parts.hostname, parts.port or 80, timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def _request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        for attempt in (0, 1):  # a keep-alive connection the server closed fails once: reconnect
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            try:
                headers = {"content-type": "application/json"} if body is not None else {}
                self._conn.request(method, path, body, headers)
                reply = self._conn.getresponse()
                return reply.status, reply.read()
            except (ConnectionError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def healthz(self) -> dict:
        status, body = self._request("GET", "/healthz")
        if status not in (200, 503):
            raise ServingError(self.url, status, body)
        return json.loads(body)

    def score(self, user_ids: Sequence[int | str], candidates: Sequence[Sequence[int]], dense_ids: bool = False
              ) -> Scores:
        """POST /score; ServingError for any reply but 200."""
        body = json.dumps({"user_ids": list(user_ids), "candidates": [list(c) for c in candidates]}).encode()
        status, data = self._request("POST", "/score?dense_ids=true" if dense_ids else "/score", body)
        if status != 200:
            raise ServingError(self.url, status, data)
        doc = json.loads(data)
        n = len(doc["scores"])
        return Scores(doc["scores"], doc["cold_start"], [doc["store_version"]] * n, [doc["model_version"]] * n)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class ShardRouter:
    """Scores requests against the processes serving a sharded store, each user at the process of its shard
    (module docstring). ``urls``: one per serving process; together they must serve every shard once."""

    def __init__(self, urls: Sequence[str], timeout_s: float = 30.0) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self._local = threading.local()
        self._timeout = timeout_s
        self.count, self.user_key, self.owner = self._discover()
        self._pool = ThreadPoolExecutor(max_workers=len(self.urls), thread_name_prefix="ckv-route")

    def _client(self, i: int) -> ServerClient:
        clients = self._local.__dict__.setdefault("clients", {})
        if i not in clients:
            clients[i] = ServerClient(self.urls[i], self._timeout)
        return clients[i]

    def _discover(self) -> tuple[int, str, np.ndarray]:
        """(shard count, user key scheme, owner[shard] = index of the url serving it) from every /healthz."""
        counts, keys, owner = set(), set(), {}
        for i, url in enumerate(self.urls):
            doc = self._client(i).healthz()
            shards = doc.get("shards") or {"count": 1, "served": [0]}
            counts.add(shards["count"])
            keys.add(doc.get("user_key") or INT)
            for s in shards["served"]:
                if s in owner:
                    raise ValueError(f"shard {s} is served by both {self.urls[owner[s]]} and {url}")
                owner[s] = i
        if len(counts) != 1 or len(keys) != 1:
            raise ValueError(f"the servers disagree on the store: shard counts {sorted(counts)}, user keys "
                             f"{sorted(keys)} — serve one store version from all of them")
        count = counts.pop()
        missing = sorted(set(range(count)) - set(owner))
        if missing:
            raise ValueError(f"no server serves shard(s) {missing} of {count}: start one with --shards "
                             f"{','.join(map(str, missing))}")
        return count, keys.pop(), np.array([owner[s] for s in range(count)], dtype=np.int64)

    def route(self, user_ids: Sequence[int | str]) -> np.ndarray:
        """The index (into ``urls``) of the process serving each user."""
        keys = np.asarray(user_ids, dtype=np.int64) if self.user_key == INT else to_keys(list(user_ids),
                                                                                          self.user_key)
        return self.owner[shard_of(keys, self.count)]

    def score(self, user_ids: Sequence[int | str], candidates: Sequence[Sequence[int]], dense_ids: bool = False
              ) -> Scores:
        """Every user scored by the process of its shard, in request order (ServingError from any part)."""
        where = self.route(user_ids)
        parts = {int(i): np.flatnonzero(where == i) for i in np.unique(where)}

        def send(i: int) -> Scores:
            rows = parts[i]
            return self._client(i).score([user_ids[r] for r in rows], [candidates[r] for r in rows], dense_ids)

        replies = list(self._pool.map(send, parts))
        order = np.concatenate(list(parts.values())).tolist()  # request row of each reply row, part after part

        def merged(column: str) -> list:
            values = [v for r in replies for v in getattr(r, column)]
            out: list = [None] * len(order)
            for row, value in zip(order, values, strict=True):
                out[row] = value
            return out

        return Scores(*(merged(c) for c in ("scores", "cold_start", "store_versions", "model_versions")))

    def close(self) -> None:
        self._pool.shutdown()
