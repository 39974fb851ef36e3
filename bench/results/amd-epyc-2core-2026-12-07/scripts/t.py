# usage: python t.py [predict|train|c64|c2] reps  -> prints median ms
import sys, time, statistics, torch
from aunn_fast import AUNN, AUNNConfig
from aunn_fast.cpp_backend import fused_adamw_step
from aunn_fast.inference import optimizer_step
what = sys.argv[1]; reps = int(sys.argv[2]) if len(sys.argv) > 2 else 50
import os
if os.environ.get("THREADS"): torch.set_num_threads(int(os.environ["THREADS"]))
torch.manual_seed(0)
cfg = AUNNConfig()
model = AUNN(cfg, backend="cpp")
model.validate = False if hasattr(model, "validate") else None
g = torch.Generator().manual_seed(1)
batch = int(os.environ.get("BATCH", 0)) or {"predict": 8192, "train": 8192, "c64": 64, "c2": 2, "op": 8192}[what]
sets = [(torch.randint(0, cfg.max_index, (batch,), generator=g), torch.randint(0, cfg.vocab_size, (batch,), generator=g)) for _ in range(4)]
if what == "predict":
    f = lambda i, t: model.predict(i)
elif what == "op":
    p = list(model.params)
    from aunn_fast import cpp_backend
    ops, st = cpp_backend._operands(model.params, cfg, "fp32")
    f = lambda i, t: torch.ops.aunn_fast.cpp_argmax(i, *ops, *st)
elif what == "train":
    f = fused_adamw_step(model, torch.optim.AdamW(model.parameters(), lr=1e-3), max_norm=None)
else:
    f = optimizer_step(model, "sgd", 1e-2, batch, total_steps=1)
for k in range(10): f(*sets[k % 4])
ts = []; cs = []
inner = max(1, int(2e-3 / 1e-3)) if batch > 64 else 50
for k in range(reps):
    t0 = time.perf_counter(); c0 = time.process_time()
    for j in range(inner): f(*sets[(k + j) % 4])
    ts.append((time.perf_counter() - t0) / inner * 1e3); cs.append((time.process_time() - c0) / inner * 1e3)
print(f"{what} {statistics.median(ts):.4f} ms  min {min(ts):.4f}  cpu {statistics.median(cs):.4f} min {min(cs):.4f}")
