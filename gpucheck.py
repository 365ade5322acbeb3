import sys, time, json, torch
from sdterm.cli import _random_source
from sdterm.config import RenderRequest, parse_size
from sdterm.engine.pipeline import Engine
from sdterm.engine.embedding_cache import EmbeddingCache
import numpy as np
G = 2**30
size = sys.argv[1] if len(sys.argv) > 1 else "512x512"
budgets = sys.argv[2].split(",") if len(sys.argv) > 2 else ["none", "4G", "2G", "1G"]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 20
w, h = map(int, size.split("x"))
eng = Engine(_random_source(None), "cuda", cache=EmbeddingCache("/tmp/ec"))
req = RenderRequest("a red fox", seed=1, steps=steps, width=w, height=h)
ref = None
for b in budgets:
    eng.set_budget(None if b == "none" else parse_size(b))
    eng.generate(req)  # warm: builds, pins, caches the prompt
    torch.cuda.synchronize(); t = time.perf_counter()
    r = eng.generate(req)
    torch.cuda.synchronize(); dt = time.perf_counter() - t
    img = np.asarray(r.image).astype(int)
    if ref is None: ref = img
    peak = max(s.peak_allocated for s in r.stages); res = max(s.peak_reserved for s in r.stages)
    print(f"{size} budget {b:5} {dt:6.3f}s unet {r.stages[1].run_seconds/steps*1000:6.1f} ms/step load {r.stages[1].load_seconds:.3f}s peak {peak/G:.3f} GiB res {res/G:.3f} GiB | " + " ".join(f"{s.stage}:{s.peak_allocated/G:.2f}/{s.peak_reserved/G:.2f}" for s in r.stages) + f" | maxdiff {np.abs(img-ref).max()} | {r.plan}", flush=True)
