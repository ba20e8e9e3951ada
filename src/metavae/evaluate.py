"""`metavae evaluate`: is a trained model's embedding any good on these distributions?

Why controls: an embedding is only worth its training if it beats what needs none. Beside the
model's posterior means we score, at the same dimension d, the raw (scaled) features' PCA and a
random projection, the raw features themselves, and the untrained network (same config, seed and
init). With labels: a standardised linear probe (C by 3-fold CV on the train split only, the
smaller C on ties) and k-means ARI, per distribution, averaged. Also: held-out log-likelihood where
the model can score, the mean KL per latent dimension (which dimensions are in use), and for
images reconstruction and sample grids.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from .io import atomic_write, atomic_write_text, write_json

CONTROLS = ("raw", "pca", "random_projection", "untrained")
PROBE_CS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)  # ascending: GridSearchCV keeps the first best, the smaller C
ACTIVE_KL = 0.01  # nats: a latent dimension whose mean KL exceeds this is in use


def probe_accuracy(z: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int = 0) -> float | None:
    """Test accuracy of a standardised logistic regression, C by 3-fold CV on the train rows only."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes, counts = np.unique(y[train], return_counts=True)
    if len(classes) < 2 or len(test) == 0:
        return None
    folds = min(3, int(counts.min()))
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    if folds >= 2:
        pipe = GridSearchCV(pipe, {"logisticregression__C": list(PROBE_CS)},
                            cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    pipe.fit(z[train], y[train])
    return float((pipe.predict(z[test]) == y[test]).mean())


def kmeans_ari(z: np.ndarray, y: np.ndarray, seed: int = 0) -> float | None:
    """Adjusted Rand index of k-means (k = the number of labels) on standardised features."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score
    from sklearn.preprocessing import StandardScaler

    k = len(np.unique(y))
    if k < 2 or len(y) <= k:
        return None
    pred = KMeans(k, n_init=10, random_state=seed).fit_predict(StandardScaler().fit_transform(z))
    return float(adjusted_rand_score(y, pred))


def split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Half the rows for training probes, half for testing, stratified where every class has two."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    _, counts = np.unique(y, return_counts=True)
    strat = y if counts.min() >= 2 else None
    return train_test_split(idx, test_size=0.5, random_state=seed, stratify=strat)


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


@torch.no_grad()
def _log_likelihood(model, scaler, x: torch.Tensor, ctx, dist: int | None, likelihood: str, k: int = 20,
                    limit: int = 256) -> float | None:
    """Mean importance-weighted log p(x) per point in the data's units, or None where the model cannot
    score these points (a MetaVAE has decoders only for its training distributions)."""
    from .preprocess import data_log_prob

    x = x[:limit].to(next(model.parameters()).device)
    torch.manual_seed(0)
    if hasattr(model, "c_dim"):
        lp = model.log_prob(x, ctx, k=k)
    elif hasattr(model, "n_decoders"):
        if dist is None:
            return None
        lp = model.log_prob(x, ctx if model.uses_context else None, dist=dist, k=k)
    else:
        return None
    return float(data_log_prob(lp, scaler, likelihood).mean())


@torch.no_grad()
def _kl_per_dim(model, x: torch.Tensor, ctx) -> list | None:
    from .models.metavae import MetaVAE

    latent = getattr(model, "latent", None)
    if not hasattr(latent, "kl_per_dim") or not isinstance(model, MetaVAE):
        return None  # the NS and VHE's q(z | x, c) has a learned prior p(z | c): not this N(0, I) read-out
    params = model.encode(x.to(next(model.parameters()).device), ctx if model.uses_context else None)
    return latent.kl_per_dim(params).mean(0).cpu().tolist()


def evaluate_files(model_path, data_path, out, dist_column: str = "distribution", label_column: str | None = None,
                   seed: int = 0, device: str = "cpu", progress: bool = True) -> dict:
    """Score the model's embeddings of every distribution in ``data_path`` beside the controls;
    writes ``out/metrics.json`` (``model``, ``controls``), ``out/report.md`` and, for images, PNG
    grids. Returns the metrics with a ``verdict``: which controls the embedding beats, in words."""
    from .workflows import draw_context, load_fitted, read_points, untrained_copy

    out = Path(out)
    model, scaler = load_fitted(model_path, device)
    extra = getattr(model, "extra", {})
    family = read_points(data_path, dist_column, label_column, model=model)
    likelihood = extra.get("likelihood", getattr(model.likelihood, "name", "gaussian"))
    size = int(extra.get("context_size", 10))
    names_trained = list(extra.get("distributions", []))
    untrained = untrained_copy(model)
    uses = getattr(model, "uses_context", True)
    xs = [scaler.to_model(p) for p in family.points]
    ctxs = [draw_context(x, size, seed + k).to(device) if uses else None for k, x in enumerate(xs)]
    reps = _embeddings(model, untrained, xs, ctxs, progress)
    raw = [x.reshape(len(x), -1).numpy() for x in xs]
    labels = family.labels
    splits = [split(np.asarray(y), seed) for y in labels] if labels is not None else \
        [split(np.zeros(len(r)), seed) for r in raw]
    reps.update(_controls(raw, splits, reps["model"][0].shape[1], seed))
    if untrained is None:
        del reps["untrained"]
    scores = _scores(reps, family, splits, seed, progress)
    for name, m in (("model", model), ("untrained", untrained)):
        if m is None:
            continue
        # a VAE's one decoder scores any distribution; a MetaVAE's decoders only their own
        lls = [_log_likelihood(m, scaler, x, ctx, names_trained.index(n) if n in names_trained else
                               (0 if not uses and m.n_decoders == 1 else None), likelihood)
               for n, x, ctx in zip(family.names, xs, ctxs)]
        scores[name]["log_likelihood"] = _mean(lls)
        scores[name]["log_likelihood_per_distribution"] = dict(zip(family.names, lls))
    kls = [_kl_per_dim(model, x[:512], ctx) for x, ctx in zip(xs, ctxs)]
    kl = None if kls[0] is None else np.mean(kls, axis=0).tolist()
    metrics = {"data": str(Path(data_path).expanduser().resolve()), "distributions": family.names,
               "points": [len(x) for x in xs], "labels": label_column if labels is not None else None,
               "arch": extra.get("arch"), "likelihood": likelihood, "scale": scaler.kind,
               "model": scores["model"], "controls": {c: scores.get(c) for c in CONTROLS},
               "kl_per_dim": kl, "active_dims": None if kl is None else int(sum(v > ACTIVE_KL for v in kl))}
    metrics["verdict"] = verdict(metrics)
    out.mkdir(parents=True, exist_ok=True)
    if len(model.event_shape) >= 2:
        metrics["figures"] = _image_grids(model, scaler, xs, ctxs, family.names, names_trained, out, seed)
    write_json(metrics, out / "metrics.json")
    atomic_write_text(report(metrics), out / "report.md")
    return metrics


def _embeddings(model, untrained, xs, ctxs, progress: bool) -> dict:
    """Posterior means of every distribution's points under the model and its untrained copy."""
    from tqdm.auto import tqdm

    from .workflows import embed_points

    reps = {"model": [], "untrained": []}
    for x, ctx in tqdm(list(zip(xs, ctxs)), desc="embed", disable=not progress, leave=False):
        reps["model"].append(embed_points(model, x, ctx))
        if untrained is not None:
            reps["untrained"].append(embed_points(untrained, x, ctx))
    return reps


def _controls(raw: list, splits: list, d: int, seed: int) -> dict:
    """The controls that need no training: the raw features, their PCA and a random projection to
    the embedding's dimension d, both fitted on the train rows of every distribution."""
    from sklearn.decomposition import PCA
    from sklearn.random_projection import GaussianRandomProjection

    fit_rows = np.concatenate([r[tr] for r, (tr, _) in zip(raw, splits)])
    n_comp = min(d, fit_rows.shape[1], len(fit_rows))
    pca = PCA(n_comp, random_state=seed).fit(fit_rows)
    with warnings.catch_warnings():  # d may exceed the number of features: then nothing is reduced, as said
        warnings.simplefilter("ignore")
        rp = GaussianRandomProjection(d, random_state=seed).fit(fit_rows)
    return {"raw": raw, "pca": [pca.transform(r) for r in raw], "random_projection": [rp.transform(r) for r in raw]}


def _scores(reps: dict, family, splits: list, seed: int, progress: bool) -> dict:
    """Per embedding: the probe accuracy and k-means ARI of each distribution (with labels), and their means."""
    from tqdm.auto import tqdm

    scores = {}
    for name, zs in tqdm(list(reps.items()), desc="probes", disable=not progress, leave=False):
        per = {}
        for k, dist in enumerate(family.names):
            row = {}
            if family.labels is not None:
                y = np.asarray(family.labels[k])
                tr, te = splits[k]
                row["probe_accuracy"] = probe_accuracy(zs[k], y, tr, te, seed)
                row["kmeans_ari"] = kmeans_ari(zs[k], y, seed)
            per[dist] = row
        scores[name] = {"dim": int(zs[0].shape[1]), "per_distribution": per,
                        "probe_accuracy": _mean(r.get("probe_accuracy") for r in per.values()),
                        "kmeans_ari": _mean(r.get("kmeans_ari") for r in per.values())}
    return scores


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"


# report.md's prose (str.format templates), filled from metrics.json by `report`
ROW = "| {name} | {dim} | {probe} | {ari} | {ll} |"
TABLE_HEAD = "| embedding | dim | probe accuracy | k-means ARI | log-likelihood / point |\n|---|---|---|---|---|"
NO_LIKELIHOOD = ("\nLog-likelihood: '-' where the model has no decoder for these distributions (a MetaVAE on unseen "
                 "ones: `metavae adapt` first; the NS and VHE score any context's distribution).\n")
KL_LINE = "\nMean KL per latent dimension (nats): {kl} ({active} above {threshold}: in use)\n"


def report(metrics: dict) -> str:
    """The model and every control in one markdown table, then the KL per latent dimension."""
    rows = [("model", metrics["model"])] + [(c, metrics["controls"][c]) for c in CONTROLS]
    lines = [TABLE_HEAD]
    for name, m in rows:
        if m is None:
            lines.append(ROW.format(name=name, dim="-", probe="not available", ari="-", ll="-"))
            continue
        lines.append(ROW.format(name=name, dim=m["dim"], probe=_fmt(m.get("probe_accuracy")),
                                ari=_fmt(m.get("kmeans_ari")), ll=_fmt(m.get("log_likelihood"))))
    text = "\n".join(lines) + "\n"
    if metrics["model"].get("log_likelihood") is None:
        text += NO_LIKELIHOOD
    if metrics.get("kl_per_dim") is not None:
        kl = ", ".join(f"{v:.2f}" for v in metrics["kl_per_dim"])
        text += KL_LINE.format(kl=kl, active=metrics["active_dims"], threshold=ACTIVE_KL)
    return text + "\n" + metrics["verdict"] + "\n"


def verdict(metrics: dict) -> str:
    """Which controls the embedding beats, in words: on probe accuracy, then on k-means ARI (one line)."""
    said = []
    for key, what in (("probe_accuracy", "linear-probe accuracy"), ("kmeans_ari", "k-means ARI")):
        mine = metrics["model"].get(key)
        if mine is None:
            continue
        beats, ties, loses = [], [], []
        for c in CONTROLS:
            theirs = (metrics["controls"].get(c) or {}).get(key)
            if theirs is not None:
                side = ties if abs(mine - theirs) < 1e-9 else beats if mine > theirs else loses
                side.append(f"{c} ({theirs:.3f})")
        text = f"{'On' if not said else 'on'} {what} the embedding ({mine:.3f}) "
        text += f"beats {', '.join(beats)}" if beats else "beats no control"
        text += f"; ties {', '.join(ties)}" if ties else ""
        said.append(text + (f"; does not beat {', '.join(loses)}" if loses else ""))
    if not said:
        return "No labels (--label-column): nothing to compare the embedding with; see log-likelihood and KL per dimension."
    return ". Then ".join(said) + "."


def _image_grids(model, scaler, xs, ctxs, names, names_trained, out: Path, seed: int) -> dict:
    """reconstructions.png (rows: data, reconstruction) and samples.png for the first distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .workflows import sample_model

    x, ctx, name = xs[0][:8], ctxs[0], names[0]
    files = {}
    try:
        with torch.no_grad():
            dev = next(model.parameters()).device
            if not hasattr(model, "c_dim"):  # a MetaVAE: its own decoder for a training distribution, else the nearest
                k = names_trained.index(name) if name in names_trained else model._nearest_decoder(
                    xs[0][:64].to(dev), min(64, len(xs[0])), min(len(xs[0]), 10), seed)
                z = model.embed(x.to(dev), ctx if model.uses_context else None)
                rec = model.likelihood.mean(model.decode(z.unsqueeze(0), torch.tensor([k]))[0]).reshape(x.shape)
                samples = sample_model(model, scaler, 16, None, k, seed, mean=True)
            else:
                rec = None
                samples = sample_model(model, scaler, 16, ctx, None, seed, mean=True)
    except (ValueError, RuntimeError) as e:  # a model without a decoder for these: no grids, say why
        print(f"metavae: notice: no image grids ({str(e).splitlines()[0]})", file=sys.stderr)
        return files
    rows = [("data", scaler.to_data(x).cpu())] + ([("reconstruction", scaler.to_data(rec).cpu())] if rec is not None
                                                 else [])
    for fname, grid in (("reconstructions.png", rows), ("samples.png", [("samples (means)", samples)])):
        n = max(len(g) for _, g in grid)
        fig, axes = plt.subplots(len(grid), n, figsize=(n * 0.9, len(grid) * 1.0), squeeze=False)
        for r, (label, imgs) in enumerate(grid):
            for c in range(n):
                ax = axes[r][c]
                ax.axis("off")
                if c < len(imgs):
                    img = imgs[c].numpy()
                    img = img[0] if img.ndim == 3 and img.shape[0] == 1 else np.moveaxis(img, 0, -1) if img.ndim == 3 else img
                    ax.imshow(img, cmap="gray")
            axes[r][0].set_title(label, fontsize=7, loc="left")
        atomic_write(out / fname, lambda f, fig=fig: fig.savefig(f, format="png", dpi=80, bbox_inches="tight"))
        plt.close(fig)
        files[fname.split(".")[0]] = fname
    return files
