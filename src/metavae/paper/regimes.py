"""Where does conditioning on a context set help? The regime map of transformed MNIST (rotate,
contiguous split), rebuilt from finished runs by `metavae report mnist`:

* the ablations that isolate the context: ``vae`` (one decoder, q(z | x)) and
  ``metavae-nocontext`` (the MetaVAE's K decoders, q(z | x)) beside the MetaVAE and the VHE;
* the number of seen values K (runs with ``--set seen=K``, same steps and images per step);
* the context size at test N (``--set test_context_sizes=[...]``, the trained weights unchanged);
* equal training time: both probes at the snapshots' training seconds (learning curves).

Every number comes from the runs' metrics.json; the verdict's wording is chosen by the numbers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..io import atomic_write_text
from .common import markdown_table
from .invariance import CONTROLS, PROBES, fmt_seeds, over_seeds

AXIS, SPLIT = "rotate", "contiguous"
REGIME_MODELS = ("metavae", "vhe")
K_CONTROL = "vae"  # no context, one decoder over the K seen values: what conditioning on D is measured against
ABLATIONS = ("metavae", "vhe", "vhe-vampprior", "ns", "metavae-nocontext", "vae")
MARGIN = 0.01  # a difference below this (or within the seeds' spread) is reported as level


def is_regime_label(label: str) -> bool:
    """Runs on a subset of the seen values belong to the regime map, not to Table 2."""
    return "(seen " in label


def _seen(m: dict) -> int:
    return (m.get("config") or {}).get("seen") or len(m.get("seen", ()))


def by_k(found: dict, model: str) -> dict:
    """{K: [metrics per seed]} of ``model``'s default-settings runs on rotate/contiguous."""
    out: dict = {}
    for (axis, split, label), runs in found.items():
        if axis != AXIS or split != SPLIT or label not in (model, f"{model} (seen {_seen(runs[0])})"):
            continue  # another model, or a variant beyond seen=K: not on the map
        for m in runs:
            out.setdefault(_seen(m), []).append(m)
    return dict(sorted(out.items()))


def _acc(runs: list, probe: str, key=lambda m: m["mean_unseen_accuracy"]) -> dict | None:
    return over_seeds([key(m)[probe] for m in runs])


def compare(a: dict | None, b: dict | None) -> str:
    """'higher' / 'lower' / 'level': a against b, level when within MARGIN or the seeds' spread."""
    if a is None or b is None:
        return "unmeasured"
    diff, spread = a["mean"] - b["mean"], max(a["std"], b["std"])
    if abs(diff) < max(MARGIN, spread):
        return "level"
    return "higher" if diff > 0 else "lower"


def ablation_rows(found: dict) -> list:
    """Table rows: each model or control on rotate/contiguous, both probes and its untrained control."""
    rows = []
    for model in ABLATIONS + CONTROLS:
        runs = found.get((AXIS, SPLIT, model), [])
        if not runs:
            continue
        untrained = [m for m in runs if "untrained" in m]
        rows.append([model, len(runs)] + [fmt_seeds(_acc(runs, p)) for p in PROBES]
                    + [fmt_seeds(_acc(untrained, p, lambda m: m["untrained"]["mean_unseen_accuracy"])) if untrained else "-"
                       for p in PROBES])
    return rows


K_MODELS = REGIME_MODELS + (K_CONTROL,)
K_COLUMNS = [f"{m}, {p}" for m in K_MODELS for p in PROBES] + ["MetaVAE vs VHE (standardised)",
                                                               f"MetaVAE vs {K_CONTROL} (standardised)"]


def k_rows(found: dict) -> tuple:
    """(rows of the K table, {model: {K: {probe: over_seeds}}}): the MetaVAE, the VHE and the
    no-context control trained on the same K seen values."""
    data = {m: {k: {p: _acc(runs, p) for p in PROBES} for k, runs in by_k(found, m).items()} for m in K_MODELS}
    ks = sorted({k for m in REGIME_MODELS for k in data[m]})

    def std(m, k):
        return data[m].get(k, {}).get("standardised")

    rows = [[k] + [fmt_seeds(data[m].get(k, {}).get(p)) for m in K_MODELS for p in PROBES]
            + [compare(std("metavae", k), std("vhe", k)), compare(std("metavae", k), std(K_CONTROL, k))]
            for k in ks]
    return rows, data


def n_rows(found: dict) -> tuple:
    """(rows of the test-context-size table, {model: {N: {probe: mean}}}) from runs that carry it."""
    data = {}
    for model in REGIME_MODELS + ("vhe-vampprior",):
        for m in found.get((AXIS, SPLIT, model), []):
            for n, r in (m.get("by_test_context_size") or {}).items():
                for p in PROBES:
                    data.setdefault(model, {}).setdefault(int(n), {}).setdefault(p, []).append(
                        r["mean_unseen_accuracy"][p])
    data = {m: {n: {p: over_seeds(v) for p, v in d.items()} for n, d in sorted(ns.items())} for m, ns in data.items()}
    ns = sorted({n for d in data.values() for n in d})
    rows = [[n] + [fmt_seeds(data.get(m, {}).get(n, {}).get(p)) for m in REGIME_MODELS for p in PROBES] for n in ns]
    return rows, data


def seconds_at(m: dict, step: int) -> float:
    """Training seconds at ``step``, from the run's per-epoch history (linear within an epoch)."""
    hist = m.get("history") or []
    steps = [0] + [h["step"] for h in hist]
    secs = np.cumsum([0.0] + [h["seconds"] for h in hist])
    return float(np.interp(step, steps, secs))


def time_curves(found: dict) -> dict:
    """{model: [(seconds, {probe: mean accuracy on the curve values})]} for the K=10 runs' first seed."""
    out = {}
    for model in REGIME_MODELS:
        runs = found.get((AXIS, SPLIT, model), [])
        if runs and runs[0].get("learning_curve"):
            m = runs[0]
            out[model] = [(seconds_at(m, c["step"]), c["mean_accuracy"]) for c in m["learning_curve"]]
    return out


def equal_time_rows(curves: dict) -> list:
    """At each MetaVAE snapshot's seconds, both models' probes (the VHE's interpolated between its
    snapshots; "-" past a curve's end, or where a probe was not measured at every snapshot, as the
    reference probe is not between the ends of newer curves (`invariance.CURVE_PROBES`), unless it
    was measured at that very point)."""
    if not all(m in curves for m in REGIME_MODELS):
        return []
    rows = []
    for t, _ in curves["metavae"][1:]:
        row = [f"{t:.0f}"]
        for model in REGIME_MODELS:
            ts = [s for s, _ in curves[model]]
            for p in PROBES:
                at = [a[p] for s, a in curves[model] if s == t and p in a]
                if at:
                    row.append(f"{at[0]:.3f}")
                elif t <= ts[-1] and all(p in a for _, a in curves[model]):
                    row.append(f"{np.interp(t, ts, [a[p] for _, a in curves[model]]):.3f}")
                else:
                    row.append("-")
        rows.append(row)
    return rows


def figure(path: Path, k_data: dict, n_data: dict, curves: dict, controls: dict) -> None:
    """regimes.png: standardised-probe accuracy against K, against N at test, and against training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plots import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for i, model in enumerate(K_MODELS):
        ks = sorted(k_data.get(model, {}))
        ys = [k_data[model][k]["standardised"] for k in ks]
        if ks:
            axes[0].errorbar(ks, [y["mean"] for y in ys], [y["std"] for y in ys], fmt="o-" if model in REGIME_MODELS
                             else "s--", label=model if model in REGIME_MODELS else f"{model} (no context)", color=f"C{i}")
        if model not in REGIME_MODELS:
            continue
        ns = sorted(n_data.get(model, {}))
        if ns:
            axes[1].plot(ns, [n_data[model][n]["standardised"]["mean"] for n in ns], "o-", label=model, color=f"C{i}")
        if model in curves:
            axes[2].plot([t for t, _ in curves[model]], [a["standardised"] for _, a in curves[model]], "o-",
                         label=model, color=f"C{i}")
    for name, value in controls.items():
        for ax in axes[:2]:
            ax.axhline(value, ls="--", lw=1, color="grey")
            ax.text(ax.get_xlim()[0], value, f" {name}", fontsize=7, va="bottom", color="grey")
    for ax, xlabel, title in zip(axes, ("seen rotations K", "context size at test N", "training seconds"),
                                 ("unseen accuracy vs K", "vs test context size (K=10)",
                                  "vs training time (K=10, curve values)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("standardised probe")
        ax.set_title(title, fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[1].set_xscale("log")
    save_figure(fig, path)


def context_vs_no_context(found: dict, k_data: dict) -> list:
    """Every measured comparison of a model conditioned on D (the MetaVAE, the VHE) with a
    no-context control trained on the same seen values: [{"model", "control", "K", "context",
    "no_context", "verdict"}] (standardised probe; `compare`'s rule). The README's verdict is
    checked against these (tests/test_readme.py)."""
    out = []
    for model in REGIME_MODELS:
        for k, accs in k_data.get(model, {}).items():
            controls = [(K_CONTROL, k_data.get(K_CONTROL, {}).get(k, {}).get("standardised"))]
            if k == 10:
                controls.append(("metavae-nocontext", _acc(found.get((AXIS, SPLIT, "metavae-nocontext"), []),
                                                           "standardised")))
            for control, b in controls:
                if b is not None:
                    out.append({"model": model, "control": control, "K": k, "context": accs["standardised"],
                                "no_context": b, "verdict": compare(accs["standardised"], b)})
    return out


def verdict(found: dict, k_data: dict) -> list:
    """The claims, each worded by its numbers (standardised probe; `compare`'s rule)."""
    std = {m: _acc(found.get((AXIS, SPLIT, m), []), "standardised") for m in ABLATIONS + CONTROLS}
    lines = []
    for ctx in ("metavae", "vhe"):
        for ctl in ("metavae-nocontext", "vae", "random-projection", "pixels"):
            if std.get(ctx) and std.get(ctl):
                lines.append(f"- K=10, N=10: {ctx} {fmt_seeds(std[ctx])} against {ctl} {fmt_seeds(std[ctl])}: "
                             f"**{compare(std[ctx], std[ctl])}**.")
    for m, (unpooled, pooled) in pooling_pairs(found).items():
        lines.append(f"- Pooling (K=10, N=10): {m} with each query's own contexts {fmt_seeds(unpooled)} against "
                     f"contexts from a pool of 50 {fmt_seeds(pooled)}: **{compare(unpooled, pooled)}**.")
    for k in sorted(set(k_data.get("metavae", {})) & set(k_data.get("vhe", {}))):
        a, b = k_data["metavae"][k]["standardised"], k_data["vhe"][k]["standardised"]
        lines.append(f"- K={k}: metavae {fmt_seeds(a)} against vhe {fmt_seeds(b)}: **{compare(a, b)}**.")
    for model in REGIME_MODELS:  # K=10 is the first block's
        for k in sorted(set(k_data.get(model, {})) & set(k_data.get(K_CONTROL, {})) - {10}):
            a, b = k_data[model][k]["standardised"], k_data[K_CONTROL][k]["standardised"]
            lines.append(f"- K={k}: {model} {fmt_seeds(a)} against {K_CONTROL} (no context, same K) {fmt_seeds(b)}: "
                         f"**{compare(a, b)}**.")
    return lines


def pooling_pairs(found: dict) -> dict:
    """{model: (unpooled, pooled)} standardised accuracies over seeds, where both are measured."""
    pairs = {}
    for m in REGIME_MODELS:
        unpooled = _acc(found.get((AXIS, SPLIT, f"{m} (context_pool None)"), []), "standardised")
        pooled = _acc(found.get((AXIS, SPLIT, m), []), "standardised")
        if unpooled and pooled:
            pairs[m] = (unpooled, pooled)
    return pairs


def pooling_rows(found: dict) -> list:
    """Each regime model pooled (the long preset's context_pool=50) beside its unpooled runs
    (``--set context_pool=null``: every query embeds its own N context images)."""
    rows = []
    for model in REGIME_MODELS:
        for label in (model, f"{model} (context_pool None)"):
            runs = found.get((AXIS, SPLIT, label), [])
            if runs:
                secs = over_seeds([m.get("train_seconds_total", m.get("train_seconds")) for m in runs
                                   if m.get("train_seconds_total", m.get("train_seconds"))])
                rows.append([label, len(runs)] + [fmt_seeds(_acc(runs, p)) for p in PROBES]
                            + [f"{secs['mean']:.0f}" if secs else "-"])
    return rows


def reference_bug_rows(found: dict) -> list:
    """The reference's baseline selection taken apart (`benchmarks/reference_bugs.py`, its JSON beside
    a run as reference_bugs.json): each of {best, worst checkpoint} x {mean, sampled c}, both probes."""
    rows = []
    for (axis, split, label), runs in sorted(found.items()):
        for m in runs:
            path = Path(m.get("_path", "")) / "reference_bugs.json"
            if axis == AXIS and split == SPLIT and m.get("_path") and path.is_file():
                cells = json.loads(path.read_text())["cells"]
                rows += [[f"{label}, seed {m['seed']}", name] + [f"{c['mean_unseen_accuracy'][p]:.3f}" for p in PROBES]
                         for name, c in cells.items()]
    return rows


def step_cost_rows(path: Path) -> list:
    """Rows from benchmarks/model_steps.py's JSON (copied beside the runs as model_steps.json):
    each model's step time and FLOPs against the MetaVAE's, measured interleaved in one process."""
    if not path.is_file():
        return []
    b = json.loads(path.read_text())
    return [[m, f"{ms:.0f}", f"{b['over_metavae'][m]:.2f}", f"{b['gflop_per_step'][m]:.1f}",
             f"{b['flop_over_metavae'][m]:.2f}", f"{b['gflop_per_s'][m]:.1f}"] for m, ms in b["step_ms"].items()]


def write(found: dict, out: Path, runs: Path | None = None) -> dict:
    """regimes.md, regimes.json and regimes.png under ``out`` (the mnist report's folder); the step
    costs from ``runs``/model_steps.json where the benchmark's output was copied there."""
    steps = step_cost_rows(Path(runs) / "model_steps.json") if runs is not None else []
    k_table, k_data = k_rows(found)
    n_table, n_data = n_rows(found)
    curves = time_curves(found)
    t_rows = equal_time_rows(curves)
    pool_rows, bug_rows = pooling_rows(found), reference_bug_rows(found)
    controls = {c: found[(AXIS, SPLIT, c)][0]["mean_unseen_accuracy"]["standardised"]
                for c in CONTROLS + ("vae", "metavae-nocontext") if found.get((AXIS, SPLIT, c))}
    probe_cols = [f"{m}, {p}" for m in REGIME_MODELS for p in PROBES]
    lines = [
        "# Where does conditioning on a context set help? (MNIST rotate, contiguous split)", "",
        "Mean unseen accuracy (8 unseen rotations) ± std over seeds (number of seeds). *level*: within "
        f"{MARGIN} or the seeds' spread. Regenerated by `metavae report mnist` from `results/`.", "",
        "## Ablations that isolate the context (K=10, N=10)", "",
        markdown_table(["model", "seeds"] + [f"{p} probe" for p in PROBES] + [f"untrained, {p}" for p in PROBES],
                       ablation_rows(found)), "",
        "## Number of seen rotations K (same steps, same images per step)", "",
        markdown_table(["K"] + K_COLUMNS, k_table) if k_table else "No runs yet.", "",
        "## Context size at test N (trained at N=10, K=10)", "",
        markdown_table(["N"] + probe_cols, n_table) if n_table else "No runs with `test_context_sizes` yet.", "",
        "## Pooling's cost (K=10, N=10): contexts from a pool of 50 against each query's own", "",
        markdown_table(["run", "seeds"] + [f"{p} probe" for p in PROBES] + ["training s, all epochs (mean; shared machine)"], pool_rows)
        if len(pool_rows) > len(REGIME_MODELS) else "No unpooled runs yet (`--set context_pool=null`).", "",
        "## The reference's selection of the baselines, taken apart (`benchmarks/reference_bugs.py`)", "",
        markdown_table(["run", "checkpoint, c", *(f"{p} probe" for p in PROBES)], bug_rows)
        if bug_rows else "Not measured yet.", "",
        "*best* = lowest validation loss (ours), *worst* = highest (the reference's pick); *mean c* = the mean "
        "of q(c | D) (ours), *sampled c* = one draw (the reference's). Every cell uses the same contexts and the "
        "probes of the code that measured it (`reference_bugs.json` beside the run).", "",
        "## Equal training time (K=10, first seed; mean over the learning curve's 3 unseen values)", "",
        markdown_table(["seconds"] + probe_cols, t_rows) if t_rows else "No learning curves for both models yet.", "",
        "Seconds are each run's own measured training time (machines shared with other jobs: a ratio "
        "of times is indicative; benchmarks/model_steps.json has interleaved step times).", "",
        "## Step cost at the long preset (`benchmarks/model_steps.py`, interleaved, one thread)", "",
        markdown_table(["model", "ms/step", "time / MetaVAE's", "GFLOP/step", "FLOPs / MetaVAE's", "GFLOP/s"], steps)
        if steps else "Not measured (copy benchmarks/model_steps.json beside the runs).", "",
        "## Verdict (standardised probe)", "",
        *(verdict(found, k_data) or ["No comparison measured yet."]), "",
        "![regimes](regimes.png)",
    ]
    figure(out / "regimes.png", k_data, n_data, curves, controls)
    atomic_write_text("\n".join(lines) + "\n", out / "regimes.md")
    data = {"k": {m: {str(k): v for k, v in d.items()} for m, d in k_data.items()},
            "n": {m: {str(n): v for n, v in d.items()} for m, d in n_data.items()},
            "equal_time": {m: c for m, c in curves.items()},
            "pooling": {m: {"unpooled": u, "pooled": p, "verdict": compare(u, p)} for m, (u, p) in pooling_pairs(found).items()},
            "context_vs_no_context": context_vs_no_context(found, k_data),
            "verdict": verdict(found, k_data)}
    atomic_write_text(json.dumps(data, indent=2) + "\n", out / "regimes.json")
    return data
