"""Compare two behaviour-check folders: MoG metrics, MNIST val losses and probe accuracies, exact."""
import json, sys
a, b = sys.argv[1:3]
def flat(d, pre=""):
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flat(v, f"{pre}.{k}"))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out.update(flat(v, f"{pre}[{i}]"))
    else:
        out[pre] = d
    return out
IGNORE = ("seconds", "time", "_path", "version", "commit", "started", "finished", "date", "out", "wall", "eval_s", "train_s")
bad = n = 0
for f in ["mog/metrics.json", "mnist-metavae/metrics.json", "mnist-vhe/metrics.json"]:
    x, y = flat(json.load(open(f"{a}/{f}"))), flat(json.load(open(f"{b}/{f}")))
    for k in sorted(set(x) | set(y)):
        if any(s in k.lower() for s in IGNORE):
            continue
        n += 1
        if x.get(k) != y.get(k):
            bad += 1
            if bad < 30: print(f, k, x.get(k), y.get(k))
print(f"{n} values compared, {bad} differ")
