"""Session 9 experiment: candidates copied on the main stream (old) vs first on the copy stream (new)."""
import secrets
import statistics
import sys

import numpy as np
import torch

sys.path.insert(0, ".")
import benchmarks._graphs_old as old  # noqa: E402
import benchmarks.decode_latency as dl  # noqa: E402
from cachestore.batch import HostBatcher  # noqa: E402
from cachestore.graphs import GraphedDecoder  # noqa: E402

store = sys.argv[1]
dev = torch.device("cuda")
B, L = 512, 1000
resident = dl.paper_model(1000, dev)
layout = dl.collective_layout(1000, secrets.token_hex(8), store)
host = HostBatcher(layout, pin=True, n_buffers=1).pack(np.arange(B), dl.synthetic_records(layout, B, L, seed=L))
targets = torch.randint(1, dl.N_ITEMS + 1, (B, 1))
with torch.inference_mode():
    decs = {"old": old.GraphedDecoder(resident, layout, n_users=B, pad_to=L, n_candidates=1, path="fused"),
            "new": GraphedDecoder(resident, layout, n_users=B, pad_to=L, n_candidates=1, path="fused")}
    outs = {k: g.run(host, targets).clone() for k, g in decs.items()}
    assert torch.equal(outs["old"], outs["new"])
    samples = {k: [] for k in decs}
    phases = {k: [] for k in decs}
    for _ in range(8):
        for k, g in decs.items():
            samples[k].append(dl.timed(lambda g=g: g.run(host), dev, 2, 20)["median_ms"])
            phases[k].append(dl.graph_phases(g, host, 10))
    def queued(g, reps=60):  # the replay submitted behind a 1 ms GPU sleep: all of it queued at once
        out = []
        for _ in range(reps):
            torch.cuda._sleep(2_000_000)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            g.run(host)
            e.record()
            e.synchronize()
            out.append(s.elapsed_time(e))
        return statistics.median(out)
    for _ in range(2):
        print("queued behind a sleep:", "  ".join(f"{k}: {queued(g):.4f}" for k, g in decs.items()), flush=True)
    print(store, "  ".join(
        f"{k}: {statistics.median(v):.4f} ms (after copy {statistics.median(p['after_copy_ms'] for p in phases[k]):.4f})"
        for k, v in samples.items()), flush=True)
