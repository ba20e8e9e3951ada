"""Demo: learning distribution statistics (paper section "Demo: Learning Distribution Statistics").

Two experiments share this module (the records ``single`` and ``many``, registered as
``expfam-single`` and ``expfam-many``):

* **single** (Fig. 3): for each of the Gaussian, log-normal and exponential families, a MetaVAE
  amortized over 30 distributions of that family and a VAE trained on one distribution; the MSE
  of the inferred parameter as the true parameter sweeps a range wider than the meta-train one.
* **many** (Fig. 4): one MetaVAE over the 90 distributions (30 per family) against the three
  single-family MetaVAEs, on held-out members of each family and on three families never seen in
  training (Weibull, Laplace, symmetric Beta).

A data point is a random vector of 20 i.i.d. 2-D draws; the context D holds 10 other random
vectors of the same distribution. Decoders are the known likelihoods (no parameters). A model
with a decoder for the family reads the parameter out of its posterior mean (the Gaussian mean,
the log-normal log-space mean, exp of the exponential's log-rate). A model with no decoder for
the family (every model on the unseen families; a single-family model on another family) reads it
out of its learned statistic with a linear map fitted by least squares on a few labelled
distributions of that family: the same procedure, the same labelled distributions, for every model.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .data import exponential_families as E
from ..data.meta import MetaDataset
from .models.expfam_metavae import FISHER_PER_DRAW, build_expfam_metavae
from ..settings import config, setting
from ..training import TrainConfig, resolve_device, seed_everything
from .base import Experiment
from .common import config_dict, point_cloud_train, markdown_table, render_report, sci, train_shared, write_metrics, write_report
from ..plots import save_figure

OPTIONS: set[str] = set()
# The single distributions of the paper's VAEs (Fig. 3), one parameter per coordinate.
VAE_PARAMS = {"gaussian": (-1.2, 1.1), "lognormal": (-0.5, 1.8), "exponential": (1.4, 2.8)}
READOUTS = ("posterior", "hidden", "summary")
TRAIN_SHARE = 0.8  # of each distribution's random vectors; the rest is its validation part


@config
class ExpfamConfig:
    distributions_per_family: int = 30
    draws_per_distribution: int = 10_000  # the first 80% train, the rest validation (reference: 8000 / 2000)
    # |D| 10 random vectors of the same distribution, 16 query vectors per distribution and step
    train: TrainConfig = point_cloud_train(context_size=10, batch_size=16, epochs=10,
                                           steps_per_epoch=200, lr=3e-3, grad_clip=10.0)
    draw_features: tuple = (64,)  # per-draw MLP (activated output), averaged over the 20 draws
    meta_summary: tuple = (64, 64, 64)  # MLP on each context vector's statistic, mean pooled over D
    hidden: tuple = (128, 128)
    per_coordinate: bool = True  # infer each coordinate on its own with shared weights (False: the reference's joint 2-D nets)
    balance: bool = True  # weight each distribution's ELBO by 1 / (Fisher information per draw) of its family
    sweep_points: int = 37  # parameter values per family sweep
    sweep_vectors: int = 50  # query vectors per sweep value, each with its own context set
    readout: str = setting("hidden", choices=READOUTS, help="statistic for the linear read-out: hidden (g's last "
                                                             "hidden layer), posterior, summary")
    readout_distributions: int = 10  # labelled distributions per family for the linear read-out
    readout_vectors: int = 50  # labelled random vectors per such distribution
    ridge: float = setting(1e-4, zero=True, help="the read-out's ridge penalty")


# a resume may change these: they only read out trained models
EVALUATION_ONLY = ("epochs", "sweep_points", "sweep_vectors", "readout", "readout_distributions", "readout_vectors",
                   "ridge")
PRESETS = {
    "quick": ExpfamConfig(),
    "paper": ExpfamConfig(epochs=20, steps_per_epoch=500),
}


# ----------------------------------------------------------------------------- data
def _family_data(name: str, params: torch.Tensor, cfg: ExpfamConfig, gen: torch.Generator):
    """Random vectors (M, n_vectors, 20, 2) of each distribution: train and validation parts."""
    x = E.make_random_vectors(E.FAMILIES[name].sample(params, cfg.draws_per_distribution, gen))
    cut = int(round(TRAIN_SHARE * x.shape[1]))
    return x[:, :cut], x[:, cut:]


def build_training_sets(cfg: ExpfamConfig, seed: int) -> dict:
    """Per trained family: the 30 meta-train parameters and their data, and the VAE's one distribution.
    Each family has its own random stream, so a family's data never depends on the others."""
    out = {}
    for i, name in enumerate(E.TRAIN_FAMILIES):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        fam = E.FAMILIES[name]
        params = fam.prior_sample(cfg.distributions_per_family, gen)
        train, val = _family_data(name, params, cfg, gen)
        vae_params = torch.tensor([VAE_PARAMS[name]], dtype=torch.float64)
        vtrain, vval = _family_data(name, vae_params, cfg, gen)
        out[name] = dict(params=params, train=train, val=val, vae_params=vae_params, vae_train=vtrain, vae_val=vval)
    return out


def _dataset(train, val, names) -> MetaDataset:
    return MetaDataset.from_parts(train=list(train), val=list(val), names=names)


def train_metavae(name: str, families: list[str], sets: dict, cfg, out, device, seed, progress):
    """A MetaVAE over the 30 training distributions of each family in ``families``."""
    members = [f for f in families for _ in range(cfg.distributions_per_family)]
    train = torch.cat([sets[f]["train"] for f in families])
    val = torch.cat([sets[f]["val"] for f in families])
    model = build_expfam_metavae(members, families, draw_features=cfg.draw_features,
                                 meta_summary=cfg.meta_summary, hidden_widths=cfg.hidden,
                                 per_coordinate=cfg.per_coordinate, balance=cfg.balance)
    names = [f"{f}{k}" for f in families for k in range(cfg.distributions_per_family)]
    return train_shared("expfam", name, model, _dataset(train, val, names), cfg, out, device, seed, progress,
                        evaluation_only=EVALUATION_ONLY)


def train_vae(name: str, family: str, sets: dict, cfg, out, device, seed, progress):
    model = build_expfam_metavae([family], draw_features=cfg.draw_features, meta_summary=cfg.meta_summary,
                                 hidden_widths=cfg.hidden, use_context=False, per_coordinate=cfg.per_coordinate)
    s = sets[family]
    return train_shared("expfam", name, model, _dataset(s["vae_train"], s["vae_val"], [family]), cfg, out, device, seed,
                        progress, evaluation_only=EVALUATION_ONLY)


# ----------------------------------------------------------------------------- evaluation
def draw_queries(name: str, params: torch.Tensor, n_query: int, context_size: int, gen: torch.Generator):
    """For each distribution (M, 2): queries (M, Q, 20, 2) and per-query contexts (M, Q, N, 20, 2)
    from separate draws of the same distribution."""
    per = n_query * (1 + context_size)
    v = E.make_random_vectors(E.FAMILIES[name].sample(params, per * E.VECTOR_SIZE, gen))
    q = v[:, :n_query]
    ctx = v[:, n_query:].reshape(v.shape[0], n_query, context_size, E.VECTOR_SIZE, 2)
    return q, ctx


@torch.no_grad()
def statistic(model, x: torch.Tensor, ctx: torch.Tensor, kind: str) -> torch.Tensor:
    """The learned statistic of random vectors x (M, Q, 20, 2) given their contexts, one row of
    features per coordinate: (M, Q, 2, F).

    ``posterior``: the output of the meta-inference network for that coordinate, the mean and
    log-variance of q(z_c | D, x); ``summary``: the per-draw statistic (1/20) sum_v phi(x_vc) of the
    query alone. For a model with joint 2-D networks (``per_coordinate=False``) both coordinates
    get the whole output as features."""
    if kind == "posterior":
        out = model.encode(x, ctx if model.uses_context else None)  # (M, Q, 4): means then log-variances
        if model.config.get("per_coordinate", True):
            return torch.stack(out.chunk(2, dim=-1), dim=-1)  # (M, Q, 2, 2): [mean_c, logvar_c]
    elif kind == "hidden":
        last = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)][-1]
        seen = []
        hook = last.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
        try:
            model.encode(x, ctx if model.uses_context else None)
        finally:
            hook.remove()
        out = seen[0]
        if model.config.get("per_coordinate", True):
            return out.reshape(*x.shape[:2], 2, -1)
        out = out.reshape(*x.shape[:2], -1)
    elif kind == "summary":
        out = model.query_encoder(x.reshape(-1, *x.shape[-2:])).reshape(*x.shape[:2], -1)
        if model.config.get("per_coordinate", True):
            return out.reshape(*x.shape[:2], 2, -1)
    else:
        raise ValueError(f"unknown read-out statistic '{kind}'; choose from {READOUTS}")
    return out.unsqueeze(-2).expand(*out.shape[:-1], 2, out.shape[-1])


def decoder_families(model) -> set[str]:
    return set(model.decoder.families[i] for i in model.decoder.ids.tolist())


class Evaluator:
    """Sweep and read-out data, drawn once so that every model sees the same random vectors."""

    def __init__(self, families, cfg: ExpfamConfig, seed: int):
        self.cfg, self.data = cfg, {}
        for i, name in enumerate(families):
            gen = torch.Generator().manual_seed(seed * 1000 + 500 + i)
            fam = E.FAMILIES[name]
            values = fam.sweep_values(cfg.sweep_points)
            sweep = torch.stack([values, values], dim=1)  # both coordinates at the swept value
            q, ctx = draw_queries(name, sweep, cfg.sweep_vectors, cfg.context_size, gen)
            lo, hi = fam.train_range if fam.trainable else fam.sweep
            lab = fam.prior_sample(cfg.readout_distributions, gen, lo, hi)
            lq, lctx = draw_queries(name, lab, cfg.readout_vectors, cfg.context_size, gen)
            self.data[name] = dict(values=values, sweep=sweep, q=q, ctx=ctx, lab=lab, lq=lq, lctx=lctx,
                                   range=fam.train_range)

    @torch.no_grad()
    def estimates(self, model, name: str, readout: str | None = None) -> tuple[torch.Tensor, str]:
        """Inferred parameters (P, Q, 2) over the sweep, and how they were read out."""
        d, fam = self.data[name], E.FAMILIES[name]
        if name in decoder_families(model):
            mu = model.embed(d["q"], d["ctx"] if model.uses_context else None)
            return fam.from_latent(mu.double()), "decoder"
        kind = readout or self.cfg.readout
        s_lab = statistic(model, d["lq"], d["lctx"], kind).double()  # (R, Q, 2, F)
        target = d["lab"][:, None, :].expand(s_lab.shape[:-1])
        w = fit_linear(s_lab.reshape(-1, s_lab.shape[-1]), target.reshape(-1, 1), self.cfg.ridge)
        s = statistic(model, d["q"], d["ctx"], kind).double()
        return apply_linear(w, s).squeeze(-1), f"linear map on the {kind} statistic"

    def curve(self, model, name: str, readout: str | None = None) -> tuple[np.ndarray, str]:
        est, how = self.estimates(model, name, readout)
        err = (est - self.data[name]["sweep"][:, None, :]) ** 2
        return err.mean((1, 2)).numpy(), how

    def split(self, name: str, curve: np.ndarray) -> dict:
        """Mean MSE over the sweep values inside and outside the family's meta-train range
        (families never trained on have no range: everything is "inside", "outside" is None)."""
        values, rng = self.data[name]["values"].numpy(), self.data[name]["range"]
        if rng is None:
            return {"inside": float(curve.mean()), "outside": None}
        inside = (values >= rng[0]) & (values <= rng[1])
        return {"inside": float(curve[inside].mean()), "outside": float(curve[~inside].mean())}


def fit_linear(s: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple:
    """Ridge least squares y ~ [s, 1] W on standardised features (the intercept is not penalised)."""
    mean, std = s.mean(0), s.std(0).clamp(min=1e-8)
    z = (s - mean) / std
    X = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)
    reg = ridge * len(X) * torch.eye(X.shape[1], dtype=X.dtype)
    reg[-1, -1] = 0
    W = torch.linalg.solve(X.T @ X + reg, X.T @ y)
    return W, mean, std


def apply_linear(w, s: torch.Tensor) -> torch.Tensor:
    W, mean, std = w
    z = (s - mean) / std
    return torch.cat([z, torch.ones_like(z[..., :1])], dim=-1) @ W


def exact_posterior_curve(ev: Evaluator, name: str) -> np.ndarray:
    """MSE of the exact posterior under the N(0, I) prior and the family's likelihood, read out
    like the models (the target that q(z | D, x) is trained to match; x alone is informative)."""
    d, fam = ev.data[name], E.FAMILIES[name]
    x = d["q"].double()  # (P, Q, 20, 2)
    V = x.shape[2]
    if name == "gaussian":
        mu = x.sum(2) / (V + E.VARIANCE)
    elif name == "lognormal":
        mu = torch.log(x).sum(2) / (V + E.VARIANCE)
    else:  # exponential, z = log-rate: 1-D numerical integration on a grid
        grid = torch.linspace(-8, 8, 4001, dtype=torch.float64)
        s = x.sum(2)[..., None]
        logp = -0.5 * grid**2 + V * grid - torch.exp(grid) * s
        mu = (torch.softmax(logp, -1) * grid).sum(-1)
    est = fam.from_latent(mu)
    return ((est - d["sweep"][:, None, :]) ** 2).mean((1, 2)).numpy()


# ----------------------------------------------------------------------------- experiments
def _start(cfg: ExpfamConfig, out, device: str, seed: int):
    """What both experiments begin with: the out folder, the device, the clock, the training sets."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out, resolve_device(device), time.time(), build_training_sets(cfg, seed), {}


def run_single(cfg: ExpfamConfig, out: Path, device: str = "cpu", seed: int = 0, progress: bool = True) -> dict:
    out, dev, t0, sets, models = _start(cfg, out, device, seed)
    for i, name in enumerate(E.TRAIN_FAMILIES):
        seed_everything(seed + 1 + i)
        models[("metavae", name)] = train_metavae(f"metavae_{name}", [name], sets, cfg, out, device, seed, progress)
        seed_everything(seed + 11 + i)
        models[("vae", name)] = train_vae(f"vae_{name}", name, sets, cfg, out, device, seed, progress)
    train_seconds = time.time() - t0
    ev = Evaluator(E.TRAIN_FAMILIES, cfg, seed)
    curves, mse = {}, {"metavae": {}, "vae": {}}
    for (kind, name), model in models.items():
        curves[(kind, name)], _ = ev.curve(model, name)
        mse[kind][name] = ev.split(name, curves[(kind, name)])
    floor_curves = {name: exact_posterior_curve(ev, name) for name in E.TRAIN_FAMILIES}
    floor = {name: ev.split(name, floor_curves[name]) for name in E.TRAIN_FAMILIES}
    metrics = {
        "mse": mse,
        "exact_posterior": floor,
        "vae_params": {k: list(v) for k, v in VAE_PARAMS.items()},
        "ranges": {n: {"train": list(E.FAMILIES[n].train_range), "sweep": list(E.FAMILIES[n].sweep)}
                   for n in E.TRAIN_FAMILIES},
        "sweep": {n: {"values": ev.data[n]["values"].tolist(), "metavae": curves[("metavae", n)].tolist(),
                      "vae": curves[("vae", n)].tolist(), "exact_posterior": floor_curves[n].tolist()}
                  for n in E.TRAIN_FAMILIES},
        "config": config_dict(cfg),
        "seed": seed,
        "device": str(dev),
        "train_seconds": round(train_seconds, 1),
    }
    write_metrics(out, metrics)
    _figure_single(out, ev, curves, floor_curves)
    write_report(out, _report_single(metrics, cfg))
    return metrics


MANY = "many"


def _single_name(f: str) -> str:
    return f"single_{f}"


def run_many(cfg: ExpfamConfig, out: Path, device: str = "cpu", seed: int = 0, progress: bool = True) -> dict:
    out, dev, t0, sets, models = _start(cfg, out, device, seed)
    seed_everything(seed)
    models[MANY] = train_metavae("metavae_many", list(E.TRAIN_FAMILIES), sets, cfg, out, device, seed, progress)
    for i, name in enumerate(E.TRAIN_FAMILIES):
        seed_everything(seed + 1 + i)
        models[_single_name(name)] = train_metavae(f"metavae_{name}", [name], sets, cfg, out, device, seed, progress)
    train_seconds = time.time() - t0
    families = list(E.TRAIN_FAMILIES) + list(E.UNSEEN_FAMILIES)
    ev = Evaluator(families, cfg, seed)
    curves, mse, how = {}, {}, {}
    for m, model in models.items():
        mse[m], how[m] = {}, {}
        for f in families:
            curves[(m, f)], how[m][f] = ev.curve(model, f)
            mse[m][f] = ev.split(f, curves[(m, f)])
    singles = [_single_name(f) for f in E.TRAIN_FAMILIES]
    beats = {f: all(mse[MANY][f]["inside"] < mse[s][f]["inside"] for s in singles) for f in E.UNSEEN_FAMILIES}
    # The same comparison with every read-out statistic, where a linear map is needed.
    by_readout = {}
    for kind in READOUTS:
        by_readout[kind] = {m: {f: ev.split(f, ev.curve(model, f, kind)[0])["inside"] for f in families
                                if how[m][f] != "decoder"} for m, model in models.items()}
    metrics = {
        "mse": mse,
        "many_beats_every_single_on_unseen": beats,
        "readout": how,
        "mse_inside_by_readout": by_readout,
        "ranges": {f: {"train": list(E.FAMILIES[f].train_range) if E.FAMILIES[f].trainable else None,
                       "sweep": list(E.FAMILIES[f].sweep)} for f in families},
        "sweep": {f: {"values": ev.data[f]["values"].tolist(), **{m: curves[(m, f)].tolist() for m in models}}
                  for f in families},
        "config": config_dict(cfg),
        "seed": seed,
        "device": str(dev),
        "train_seconds": round(train_seconds, 1),
    }
    write_metrics(out, metrics)
    _figure_many(out, ev, curves, list(models), families)
    write_report(out, _report_many(metrics, cfg, list(models), families))
    return metrics


# ----------------------------------------------------------------------------- figures
def _shade(ax, name):
    fam = E.FAMILIES[name]
    if fam.trainable:
        ax.axvspan(*fam.train_range, color="green", alpha=0.12, label="meta-train range")


def _figure_single(out, ev, curves, floor_curves):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), constrained_layout=True)
    for ax, (letter, name) in zip(axes, zip("abc", E.TRAIN_FAMILIES)):
        v = ev.data[name]["values"].numpy()
        _shade(ax, name)
        ax.semilogy(v, curves[("metavae", name)], "-", color="tab:blue", label="MetaVAE (30 distributions)")
        ax.semilogy(v, curves[("vae", name)], "--", color="tab:orange", label=f"VAE (one: {list(VAE_PARAMS[name])})")
        ax.semilogy(v, floor_curves[name], ":", color="k", label="exact posterior")
        ax.set_xlabel(f"true {E.FAMILIES[name].param_name}")
        ax.set_ylabel("MSE of inferred parameter")
        ax.set_title(f"({letter}) {name}")
        ax.legend(fontsize=8)
    save_figure(fig, out / "sweep.png")


def _figure_many(out, ev, curves, models, families):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {MANY: dict(color="tab:blue", lw=2.2, label="MetaVAE over 90 (3 families)")}
    for f, c in zip(E.TRAIN_FAMILIES, ("tab:orange", "tab:green", "tab:red")):
        styles[_single_name(f)] = dict(color=c, ls="--", lw=1.2, label=f"MetaVAE over 30 {f}")
    fig, axes = plt.subplots(2, 3, figsize=(16, 9), constrained_layout=True)
    for ax, letter, f in zip(axes.flat, "abcdef", families):
        v = ev.data[f]["values"].numpy()
        _shade(ax, f)
        for m in models:
            ax.semilogy(v, curves[(m, f)], **styles[m])
        seen = "in M" if E.FAMILIES[f].trainable else "not in M"
        ax.set_title(f"({letter}) {f} ({seen})")
        ax.set_xlabel(f"true {E.FAMILIES[f].param_name}")
        ax.set_ylabel("MSE of inferred parameter")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("MSE of the inferred parameter (a model with no decoder for a family is read out by a linear map "
                 "fitted on 10 labelled distributions of it)")
    save_figure(fig, out / "many_vs_single.png")


# ----------------------------------------------------------------------------- reports
def _fmt(v):
    return None if v is None else float(v)


def _common_setup(cfg: ExpfamConfig) -> str:
    """The Setup section both reports share (templates/expfam-setup.md and its encoder's template)."""
    layout = dict(net="-".join(map(str, cfg.draw_features)), summary="-".join(map(str, cfg.meta_summary)),
                  hidden="-".join(map(str, cfg.hidden)), draws=E.VECTOR_SIZE)
    encoder = render_report("expfam-encoder-shared" if cfg.per_coordinate else "expfam-encoder-joint", **layout)
    weight = {f: 1 / w for f, w in FISHER_PER_DRAW.items()}
    balance = render_report("expfam-balance", weight=weight, n_many=_n_many(cfg)) if cfg.balance else ""
    return render_report("expfam-setup", cfg=cfg, n_vec=cfg.draws_per_distribution // E.VECTOR_SIZE,
                         draws=E.VECTOR_SIZE, train_pct=round(100 * TRAIN_SHARE),
                         val_pct=round(100 * (1 - TRAIN_SHARE)), variance=E.VARIANCE, f=E.FAMILIES,
                         balance=balance.rstrip("\n"), encoder=encoder.rstrip("\n")).rstrip("\n")


def _n_many(cfg: ExpfamConfig) -> int:
    """How many distributions the model over every trained family is amortized over."""
    return len(E.TRAIN_FAMILIES) * cfg.distributions_per_family


def _common_differences(cfg: ExpfamConfig) -> str:
    return render_report("expfam-differences", cfg=cfg, lr=sci(cfg.lr), variance=E.VARIANCE, draws=E.VECTOR_SIZE,
                         f=E.FAMILIES).rstrip("\n")


def _report_single(m: dict, cfg: ExpfamConfig) -> str:
    rows = []
    for f in E.TRAIN_FAMILIES:
        rows.append([f, m["mse"]["metavae"][f]["inside"], m["mse"]["metavae"][f]["outside"],
                     m["mse"]["vae"][f]["inside"], m["mse"]["vae"][f]["outside"],
                     m["exact_posterior"][f]["inside"], m["exact_posterior"][f]["outside"]])
    headers = ["family", "MetaVAE inside", "MetaVAE outside", "VAE inside", "VAE outside",
               "exact posterior inside", "exact posterior outside"]
    better = {side: ", ".join(f"{f} {'yes' if m['mse']['metavae'][f][side] < m['mse']['vae'][f][side] else 'no'}"
                              for f in E.TRAIN_FAMILIES) for side in ("inside", "outside")}
    # the relative spread of one vector's sample mean of exponential draws: 1 / sqrt(draws)
    return render_report("expfam-single", table=markdown_table(headers, rows), better=better, draws=E.VECTOR_SIZE,
                         spread=E.VECTOR_SIZE ** -0.5, vae=VAE_PARAMS, setup=_common_setup(cfg),
                         differences=_common_differences(cfg))


READOUT_TEXT = {
    "hidden": "the last hidden layer of the inference network g(D, x) for that coordinate (the features its final "
              "linear layer maps to the posterior mean and log-variance); fitting the map amounts to refitting g's "
              "final layer for the new family (a linear probe)",
    "posterior": "the output of g(D, x) for that coordinate, the mean and log-variance of q(z_c | D, x)",
    "summary": f"the per-draw statistic (1/{E.VECTOR_SIZE}) sum_v phi(x_vc) of the query coordinate alone (no context)",
}


def _readout_note(by_readout: dict, models, families) -> str:
    """What the read-out table says, computed from it: for each statistic, how far apart the
    models' MSEs are (the largest over the smallest, per family), and whether the best model
    changes with the statistic."""
    lines, best = [], {}
    for kind, table in by_readout.items():
        spreads, winners = [], []
        for f in families:
            vals = {mdl: table[mdl].get(f) for mdl in models if table[mdl].get(f) is not None}
            if len(vals) > 1 and min(vals.values()) > 0:
                spreads.append(f"{f} {max(vals.values()) / min(vals.values()):.2g}x")
                winners.append(min(vals, key=vals.get))
        if spreads:
            best[kind] = winners
            lines.append(f"- `{kind}`: the models' MSEs differ by (largest / smallest) " + ", ".join(spreads)
                         + "; best: " + ", ".join(winners) + ".")
    same = len({tuple(w) for w in best.values()}) <= 1
    lines.append("- The best model per family is " + ("the same under every statistic." if same else
                 "**not** the same under every statistic: which model looks best depends on the read-out, and the "
                 "paper does not say which it used."))
    return "\n".join(lines)


def _report_many(m: dict, cfg: ExpfamConfig, models, families) -> str:
    headers = ["model"] + [f + (" (in)" if E.FAMILIES[f].trainable else " (unseen)") for f in families]
    rows = [[mdl] + [m["mse"][mdl][f]["inside"] for f in families] for mdl in models]
    out_rows = [[mdl] + [m["mse"][mdl][f]["outside"] for f in E.TRAIN_FAMILIES] for mdl in models]
    beats = m["many_beats_every_single_on_unseen"]
    alt = []
    for kind, table in m["mse_inside_by_readout"].items():
        for mdl in models:
            alt.append([kind + (" (used above)" if kind == cfg.readout else ""), mdl]
                       + [table[mdl].get(f) for f in families])
    sweep = E.FAMILIES[E.UNSEEN_FAMILIES[0]].sweep
    return render_report("expfam-many", cfg=cfg, table=markdown_table(headers, rows), unseen_sweep=sweep,
                         outside=markdown_table(["model"] + list(E.TRAIN_FAMILIES), out_rows),
                         verdict=", ".join(f"{f}: {'yes' if b else 'NO'}" for f, b in beats.items()),
                         ranking=_ranking(m, models, families), n_many=_n_many(cfg), d=cfg.distributions_per_family,
                         readout_text=READOUT_TEXT[cfg.readout], guess_mse=(sweep[1] - sweep[0]) ** 2 / 12,
                         by_readout=markdown_table(["statistic", "model"] + families, alt),
                         readout_note=_readout_note(m["mse_inside_by_readout"], models, families),
                         setup=_common_setup(cfg), differences=_common_differences(cfg))


def _ranking(m: dict, models, families) -> str:
    """Per family, the models from the lowest MSE inside to the highest."""
    return "\n".join(
        f"- {f}: " + " < ".join(f"{mdl} ({m['mse'][mdl][f]['inside']:.3g})"
                               for mdl in sorted(models, key=lambda k: m["mse"][k][f]["inside"]))
        for f in families)


single = Experiment(
    name="expfam-single", presets=PRESETS, run=run_single, options=OPTIONS,
    description="Sufficient statistics, one family at a time (Fig. 3): MetaVAE over 30 vs a VAE on one, parameter sweeps")
many = Experiment(
    name="expfam-many", presets=PRESETS, run=run_many, options=OPTIONS,
    description="Sufficient statistics over 3 families vs single-family MetaVAEs, on held-out and unseen families (Fig. 4)")
