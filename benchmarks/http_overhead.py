"""What HTTP costs one serving process: the cheapest reply of `ckv serve`'s server against uvicorn's.

    python benchmarks/http_overhead.py            # results in benchmarks/results/serve_load/http_overhead.json

Both servers run pinned to one core (CPU 0), the load generator (:mod:`benchmarks.serve_client`, open loop,
keep-alive, 127.0.0.1 only) to another. Each request is a ``POST /score`` of a 1 user × 64 candidates JSON
body with content type ``text/plain``, which both answer with a 415 JSON error without parsing it: what is
left is the transport — accept, read, parse the HTTP, route, write a reply.

- ``ckv``: :class:`cachestore.serving.http.HttpServer` with a real :class:`ScoringService` (a 200-user store,
  CPU runtime; the 415 never reaches it);
- ``uvicorn``: uvicorn (httptools, uvloop) with a bare ASGI app that reads the body and sends the same reply —
  the floor of any ASGI framework on it.

Per offered rate: replies/s achieved and the server's CPU seconds per reply. Needs uvicorn (a dev dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serve_client import run_load  # noqa: E402
from benchmarks.serve_load import _cpu_s, json_body  # noqa: E402
from benchmarks.timing import machine  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "serve_load" / "http_overhead.json"
REPLY = json.dumps({"error": "'text/plain' is not application/json", "field": "content-type"}).encode()

_UVICORN = """
import sys, uvicorn
REPLY = %r
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 415, "headers": [(b"content-type", b"application/json"),
                (b"content-length", str(len(REPLY)).encode())]})
    await send({"type": "http.response.body", "body": REPLY})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False, proxy_headers=False)
"""

_CKV = """
import sys
from pathlib import Path

import torch
from collectivekv.cachestore.decode.runtime_config import ServingConfig
from collectivekv.cachestore.serving.config import ServerConfig
from collectivekv.cachestore.serving.server import bind, build_service, configure_process, serve
config = ServerConfig(store=Path(sys.argv[2]), port=int(sys.argv[1]), runtime=ServingConfig(device="cpu"))
configure_process(config)
serve(build_service(config), bind("127.0.0.1", config.port))
"""


def _start(code: str, args: list[str], port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    proc = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", code, str(port), *args], env=env, cwd=ROOT)
    import socket

    for _ in range(600):  # up to 60 s (the ckv server loads its store first)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"server did not start: {code[:60]!r}")


def measure(name: str, proc: subprocess.Popen, port: int, rates: list[int], duration: float) -> list[dict]:
    body = json_body(1, 64, 0, 200)
    url = f"http://127.0.0.1:{port}"
    run_load(url, lambda i: body, "text/plain", rate=500, duration_s=1.0)  # warm-up
    rows = []
    for rate in rates:
        cpu0, t0 = _cpu_s(proc.pid), time.perf_counter()
        res = run_load(url, lambda i: body, "text/plain", rate=rate, duration_s=duration, connections=64)
        wall, cpu = time.perf_counter() - t0, _cpu_s(proc.pid) - cpu0
        replies = res.statuses.get(415, 0)
        row = {"server": name, "offered_rps": rate, "replies": replies, "other": res.sent - replies,
               "achieved_rps": round(replies / res.elapsed_s, 1), "server_cpu_us_per_reply":
               round(1e6 * cpu / max(1, replies), 1), "server_cores": round(cpu / wall, 2)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", default="2000,4000,6000,8000,10000")
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs 2 CPUs: the server on CPU 0, the load generator on another")
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0) - {0})[:1])
    rates = [int(r) for r in args.rates.split(",")]
    from benchmarks.serve_load import publish_paper_store

    work = Path(tempfile.mkdtemp(prefix="ckv-http-"))
    publish_paper_store(work / "store", work, 50, 200)
    rows = []
    servers = (("ckv", _CKV, [str(work / "store")], 18731), ("uvicorn", _UVICORN % REPLY, [], 18732))
    for name, code, extra, port in servers:
        proc = _start(code, extra, port)
        try:
            rows += measure(name, proc, port, rates, args.duration)
        finally:
            proc.terminate()
            proc.wait()
    command = "python " + " ".join(["benchmarks/http_overhead.py", *sys.argv[1:]])
    doc = {"benchmark": "http_overhead", "command": command, "machine": machine(torch.device("cpu")), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
