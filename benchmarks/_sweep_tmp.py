"""Session 9 experiment: is the full sweep's slow B 512 L 1000 row a persistent state of the process?"""
import secrets
import subprocess
import sys

import numpy as np
import torch

sys.path.insert(0, ".")
import benchmarks.decode_latency as dl  # noqa: E402
from cachestore.batch import HostBatcher  # noqa: E402
from cachestore.graphs import GraphedDecoder  # noqa: E402

store = sys.argv[1]
held = {}
orig = dl.paper_model


def pm(max_len, device):
    held["r"] = orig(max_len, device)
    return held["r"]


def clocks(tag):
    q = "clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active"
    out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True)
    print("nvidia-smi", tag, out.stdout.strip(), flush=True)


dev = torch.device("cuda")
B, L = 512, 1000


def t(tag, resident, layout, host, targets):
    g = GraphedDecoder(resident, layout, n_users=B, pad_to=L, n_candidates=1, path="fused")
    g.run(host, targets)
    ms = [dl.timed(lambda: g.run(host), dev, 5, 40)["median_ms"] for _ in range(3)]
    ph = dl.graph_phases(g, host, 40)
    print(tag, [round(m, 4) for m in ms], {k: round(v, 4) for k, v in ph.items()}, flush=True)
    return g


def probe(tag, resident):
    layout = dl.collective_layout(1000, secrets.token_hex(8), store)
    host = HostBatcher(layout, pin=True, n_buffers=1).pack(np.arange(B), dl.synthetic_records(layout, B, L, seed=L))
    targets = torch.randint(1, dl.N_ITEMS + 1, (B, 1))
    with torch.inference_mode():
        return t(tag, resident, layout, host, targets)


clocks("start")
probe("fresh process, before anything", orig(1000, dev))
dl.paper_model = pm
sys.argv = ["decode_latency.py", "--store-dtype", store, "--no-fetch", "--out", f"/tmp/sweep_{store}.json", *sys.argv[2:]]
dl.main()
clocks("after sweep")
resident = held["r"]
probe("after sweep, the sweep's model and pools", resident)
resident.__dict__.pop("_fused_pools", None)
probe("after sweep, the sweep's model, pools re-made", resident)
probe("after sweep, a new model", orig(1000, dev))
torch.cuda.empty_cache()
probe("after sweep + empty_cache, a new model", orig(1000, dev))
clocks("end")
