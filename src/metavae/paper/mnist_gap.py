"""The inference gap on transformed MNIST (`metavae run mnist-gap`, docs/gap.md §7).

MNIST has no exact posterior, but a decoder, hence log p(x | z), exists for every value a trained
MetaVAE knows: its training decoders for the *seen* values, and for an *unseen* value a decoder fitted
by `MetaVAE.adapt` to that value's training images with the encoder frozen. Under that decoder, per
test image x with a context D of the same value:

* ELBO(amortized): the encoder's q(z | D, x);
* ELBO(best): the best diagonal Gaussian q for this image, by Adam from the amortized one;
* log p(x): a k-sample (k = 1000) importance-weighted estimate with the best q as proposal;
* approximation gap = log p(x) - ELBO(best); amortization gap = ELBO(best) - ELBO(amortized),
  and what is left of it after k = 1, 10, 100 refinement steps (`refine.refine`).

Controls: q = the prior (what the encoder is worth at all), and the unseen values under their nearest
*training* decoder unadapted (the gap under a decoder that does not fit the data).

The importance-weighted estimate is a stochastic lower bound on log p(x), so the approximation gap
printed is, in expectation, below the true one; the amortization gap does not depend on it. The adapted
decoder was fitted to the frozen encoder's q, which favours a small amortization gap on unseen values:
read the unseen rows as "the encoder with a decoder made for it", not as an independent test.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .data import transforms as T
from ..data.meta import as_float
from .data.mnist import load_mnist, mnist_cache_dir
from ..models import load
from ..objectives import decoder_log_lik, elbo_of, iw_of
from ..refine import refine
from ..training import resolve_device, seed_everything
from .base import Experiment
from .common import markdown_table, render_report, write_metrics, write_report
from ..plots import save_figure
from .gap import best_gaussian, pick_lr
from .generation import adapted_copy, find_model
from .mnist import AXES

GROUPS = ("seen", "unseen-adapted", "unseen-nearest")


@dataclass(frozen=True)
class MnistGapConfig:
    runs: str = "runs/mnist-rotate/interleaved"  # holds metavae/SEED/checkpoints/best.pt of a finished run
    seed_folder: str = "seed-0"
    values: int = 3  # values scored per group (seen, unseen), spread over the run's lists
    test_images: int = 100  # queries per value: MNIST test images
    pool_images: int = 200  # training images per value: the contexts, and adapt's points on unseen values
    context_size: int = 10
    elbo_samples: int = 100  # Monte Carlo draws behind every reported ELBO
    best_steps: int = 400  # Adam steps to the best Gaussian q per image (four stages, lr 0.1 -> 1e-4)
    best_samples: int = 4  # draws per step of that optimisation
    refine_steps: tuple = (1, 10, 100)
    iw_k: int = 1000
    adapt_steps: int = 300
    adapt_lr: float = 1e-3
    chunk: int = 20  # images per importance-weighted pass (memory: iw_k x chunk decoder outputs)


PRESETS = {"quick": MnistGapConfig(), "full": MnistGapConfig(values=100, test_images=200)}


def _spread(values, n: int) -> list:
    """``n`` of ``values`` evenly spaced along the list (all of them when n >= its length)."""
    values = list(values)
    if n >= len(values):
        return values
    return [values[i] for i in np.linspace(0, len(values) - 1, n).round().astype(int)]


def _run_record(path: Path) -> dict:
    """The finished run's metrics.json beside ``.../checkpoints/best.pt``: its axis, split and values."""
    record = json.loads((path.parent.parent / "metrics.json").read_text())
    if record.get("model") != "metavae" or record.get("axis") not in AXES:
        raise ValueError(f"{path.parent.parent} is not a transformed-MNIST MetaVAE run (metavae run mnist-AXIS)")
    return record


def _queries(pool: torch.Tensor, test: torch.Tensor, context_size: int, gen) -> tuple:
    """Test images (1, B, 28, 28), each with its own context of ``context_size`` pool images."""
    idx = torch.stack([torch.randperm(len(pool), generator=gen)[:context_size] for _ in range(len(test))])
    return test.unsqueeze(0), pool[idx].unsqueeze(0)


def _iw(latent, params, log_lik_of, x, k: int, chunk: int) -> torch.Tensor:
    out = [iw_of(latent, params[:, i:i + chunk], log_lik_of(x[:, i:i + chunk]), k) for i in range(0, x.shape[1], chunk)]
    return torch.cat(out, dim=1)


def _decoders(model, value, seen: list, pool: torch.Tensor, cfg: MnistGapConfig, seed: int):
    """(group, model, decoder index) under which ``value``'s images are scored: its training decoder
    if seen; else a decoder adapted to ``pool`` with the encoder frozen, and the nearest training
    decoder unadapted (each a copy of the trained model, so values do not share decoders)."""
    if value in seen:
        return [("seen", model, seen.index(value))]
    out = []
    for group, steps in (("unseen-nearest", 0), ("unseen-adapted", cfg.adapt_steps)):
        adapted, d = adapted_copy(model, pool, steps, cfg.adapt_lr, 50, cfg.context_size, seed)
        adapted.requires_grad_(False)
        out.append((group, adapted, d))
    return out


def score(model, dist: int, x: torch.Tensor, context: torch.Tensor, lrs: dict, cfg: MnistGapConfig) -> dict:
    """Per-image ELBOs and log p(x) under decoder ``dist``: {quantity: (B,) tensor}."""
    latent, d = model.latent, torch.tensor([dist])
    log_lik_of = lambda xs: (lambda z: decoder_log_lik(model, xs, z, d))  # noqa: E731
    ll = log_lik_of(x)
    with torch.no_grad():
        p0 = model.encode(x, context)
        value = lambda p: elbo_of(latent, p, ll, cfg.elbo_samples)[0]  # noqa: E731
        out = {"elbo_amortized": value(p0), "elbo_prior": value(torch.zeros_like(p0))}
    t = time.perf_counter()
    best, _ = best_gaussian(latent, p0, ll, cfg.best_steps, cfg.best_samples)
    out["best_seconds"] = time.perf_counter() - t
    with torch.no_grad():
        out["elbo_best"] = value(best)
        out["log_px"] = _iw(latent, best, log_lik_of, x, cfg.iw_k, cfg.chunk)[0]
        out["iw_amortized"] = _iw(latent, p0, log_lik_of, x, cfg.iw_k, cfg.chunk)[0]
    for k, lr in lrs.items():
        refined = refine(latent, p0, ll, k, lr)
        with torch.no_grad():
            out[f"elbo_refined_{k}"] = value(refined)
    return out


def _summary(per_image: list[dict], ks) -> dict:
    """Means and stds over every image of a group, the gaps among them."""
    cat = {q: torch.cat([p[q] for p in per_image]) for q in per_image[0] if q != "best_seconds"}
    gaps = {"approximation_gap": cat["log_px"] - cat["elbo_best"],
            "amortization_gap": cat["elbo_best"] - cat["elbo_amortized"],
            "encoder_over_prior": cat["elbo_amortized"] - cat["elbo_prior"],
            **{f"left_after_{k}": cat["elbo_best"] - cat[f"elbo_refined_{k}"] for k in ks}}
    stats = lambda v: {"mean": float(v.mean()), "std": float(v.std())}  # noqa: E731
    return {"images": len(cat["log_px"]), **{q: stats(v) for q, v in {**cat, **gaps}.items()},
            "best_below_amortized": float((gaps["amortization_gap"] < 0).float().mean())}


def run(cfg: MnistGapConfig, out: Path, device: str = "cpu", seed: int = 0, progress: bool = True,
        data_dir=None) -> dict:
    device = resolve_device(device)
    runs = Path(cfg.runs)
    path = find_model(runs, "metavae", cfg.seed_folder)
    if path is None:
        raise ValueError(f"no finished MetaVAE run under {runs} (looked for metavae/{cfg.seed_folder}/checkpoints/"
                         "best.pt beside metrics.json); train one with `metavae run mnist-rotate --split interleaved "
                         "--preset long`, or --set runs=FOLDER")
    record = _run_record(path)
    axis = AXES[record["axis"]]
    seen = [T.canonical_value(axis, v) for v in record["seen"]]
    unseen = [T.canonical_value(axis, v) for v in record["unseen"]]
    model = load(path, device).eval().requires_grad_(False)  # refinement differentiates q's parameters only
    seed_everything(seed)
    (tr_x, _), (te_x, _) = load_mnist(data_dir, "train"), load_mnist(data_dir, "test")
    rng = np.random.default_rng(seed)
    pick = torch.from_numpy(rng.permutation(len(tr_x))[: cfg.pool_images])
    chosen = {"seen": _spread(seen, cfg.values), "unseen": _spread(unseen, cfg.values)}
    cache = mnist_cache_dir() / "transforms"
    values = chosen["seen"] + chosen["unseen"]
    pools = T.transform_split(tr_x[pick], axis, values, cache_dir=cache)
    tests = T.transform_split(te_x[: cfg.test_images], axis, values, cache_dir=cache)
    gen = torch.Generator().manual_seed(seed)
    ks = sorted(set(cfg.refine_steps))
    t0 = time.time()
    per_value: dict = {g: {} for g in GROUPS}
    lrs: dict = {}  # per group: {k: Adam step size}, chosen on *training* images of the group's first value
    for i, v in enumerate(values):
        if progress:
            print(f"[mnist-gap] {axis} {v} ({i + 1}/{len(values)})", flush=True)
        pool, test = as_float(pools[v]).to(device), as_float(tests[v]).to(device)
        x, context = _queries(pool, test, cfg.context_size, gen)
        for group, m, d in _decoders(model, v, seen, pool, cfg, seed):
            if group not in lrs:
                px, pc = _queries(pool, pool[: cfg.test_images], cfg.context_size, gen)
                with torch.no_grad():
                    start = m.encode(px, pc)
                lrs[group] = pick_lr(m.latent, start, lambda z: decoder_log_lik(m, px, z, torch.tensor([d])), ks)[0]
            per_value[group][v] = score(m, d, x, context, lrs[group], cfg)
    groups = {g: _summary(list(pv.values()), ks) for g, pv in per_value.items() if pv}
    by_value = {g: {str(v): {q: float(t.mean()) for q, t in s.items() if q != "best_seconds"}
                    for v, s in pv.items()} for g, pv in per_value.items()}
    metrics = {"experiment": "mnist-gap", "model": str(path), "axis": record["axis"], "split": record["split"],
               "run_seed": record.get("seed"), "run_epochs": record.get("epochs_trained"), "values": chosen,
               "refine_lr": {g: {str(k): lr for k, lr in r.items()} for g, r in lrs.items()}, "groups": groups,
               "per_value": by_value,
               "best_seconds_per_image": float(np.mean([s["best_seconds"] for pv in per_value.values()
                                                        for s in pv.values()])) / cfg.test_images,
               "seconds": round(time.time() - t0, 1), "seed": seed, "config": asdict(cfg)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(out, metrics)
    figure(out / "gap.png", metrics)
    write_report(out, report(metrics))
    return metrics


def gap_table(m: dict) -> str:
    """The decomposition per group, mean ± std over images (nats per image)."""
    ks = sorted(int(k) for k in m["config"]["refine_steps"])
    f = lambda s: f"{s['mean']:.2f} ± {s['std']:.2f}"  # noqa: E731
    rows = [[g, len(m["per_value"][g]), s["images"], f(s["log_px"]), f(s["elbo_best"]), f(s["elbo_amortized"]),
             f(s["approximation_gap"]), f(s["amortization_gap"]), *[f"{s[f'left_after_{k}']['mean']:.2f}" for k in ks],
             f"{s['encoder_over_prior']['mean']:.1f}"]
            for g, s in m["groups"].items()]
    return markdown_table(["decoder", "values", "images", f"log p(x) (IW-{m['config']['iw_k']})", "ELBO, best q", "ELBO, amortized",
                           "approximation gap", "amortization gap", *[f"left after k={k}" for k in ks],
                           "amortized over prior q"], rows)


def answer(m: dict) -> str:
    """The measured answer in words, from the numbers."""
    g = m["groups"]
    seen, unseen = g["seen"]["amortization_gap"]["mean"], g["unseen-adapted"]["amortization_gap"]["mean"]
    ks = sorted(int(k) for k in m["config"]["refine_steps"])
    left = g["unseen-adapted"][f"left_after_{ks[-1]}"]["mean"]
    share = lambda grp: g[grp]["amortization_gap"]["mean"] / (g[grp]["log_px"]["mean"] - g[grp]["elbo_amortized"]["mean"])  # noqa: E731
    return (f"The amortization gap is {seen:.2f} nats per image on seen {m['axis']} values and {unseen:.2f} on unseen ones "
            f"(under decoders adapted with the encoder frozen), {unseen / seen:.2f}x the seen gap; it is "
            f"{100 * share('seen'):.0f}% / {100 * share('unseen-adapted'):.0f}% of the whole gap log p(x) - ELBO, the rest "
            f"being the approximation gap of the diagonal Gaussian family. {ks[-1]} refinement steps leave {left:.2f} nats of "
            f"it on unseen values. Under the nearest training decoder, unadapted, the amortization gap is "
            f"{g['unseen-nearest']['amortization_gap']['mean']:.2f}.")


def report(m: dict) -> str:
    """report.md (templates/mnist-gap.md) from metrics.json."""
    return render_report("mnist-gap", m=m, table=gap_table(m), answer=answer(m),
                         ms_per_image=m["best_seconds_per_image"] * 1000).rstrip("\n")


def figure(path: Path, m: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    marks = {"seen": "o", "unseen-adapted": "s", "unseen-nearest": "x"}
    for g, pv in m["per_value"].items():
        vs = [float(v) for v in pv]
        for ax, (gap, lo, hi) in zip(axes, (("amortization gap", "elbo_best", "elbo_amortized"),
                                            ("approximation gap", "log_px", "elbo_best"))):
            ax.plot(vs, [pv[v][lo] - pv[v][hi] for v in pv], marks[g], label=g)
            ax.set_title(gap, fontsize=9)
            ax.set_xlabel(m["axis"])
    axes[0].set_ylabel("nats per image")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Inference gap per {m['axis']} value ({m['split']} split)", fontsize=9)
    save_figure(fig, path)


EXPERIMENT = Experiment(
    name="mnist-gap", presets=PRESETS, run=run, options={"data_dir"},
    description="Amortization and approximation gaps of a trained MNIST MetaVAE on seen and unseen values "
                "(needs a mnist-AXIS run)")
