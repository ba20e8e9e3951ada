"""Demo: inference for classical mechanics (paper section "Demo: Inference for Classical Mechanics").

A box with friction mu ~ U(0.0001, 1) slides down an inclined plane of length L and angle A; we
observe its noisy descent time. Meta-compiled inference (Eq. 14) fits q(mu | D, x) on 25 training
simulators (L in {2..10}, A in {20..60}) by minimising -log q(mu_true | D, x), where the context D
holds *observations only* of the same simulator. The baseline is compiled inference q(mu | x) on the
one simulator L=10, A=45. Both are scored on the 304 simulators L = 1..19, A = 5..80 against the
exact Bayes posterior mean, the floor no method can beat.

Inputs: a descent time t enters as 1/t^2 with a censored flag (a box that never slides has
t = 1e5, which is no time at all). 1/t^2 is proportional to the box's acceleration, hence affine in
the friction, and scales as 1/L. For the MetaVAE it is standardised by the mean and standard
deviation of the context's sliding boxes, which removes the plane's length and puts every
simulator's sliding boxes on one scale; what the network must still learn from D is the range of
frictions that slide (from the censored fraction) and how much to trust a time where the noise
matters. The single-simulator baseline, with no context, is standardised with fixed constants.
"""
from __future__ import annotations

import time
import types
import typing
from pathlib import Path

import numpy as np
import torch

from .data import physics as P
from ..data.meta import MetaDataset
from .models.compiled import build_compiled_inference
from .models.standardize import FixedStandardize, StandardizeOnContext
from ..settings import config, setting
from ..training import TrainConfig, resolve_device, seed_everything
from .base import Experiment
from .common import config_dict, point_cloud_train, markdown_table, render_report, sci, train_shared, write_metrics, write_report
from ..plots import save_figure
from ..settings import config_from_dict

DESCRIPTION = "Inclined plane: meta-compiled inference of friction over 25 simulators vs one, on 304 unseen, vs Bayes"
OPTIONS: set[str] = set()
REGION = (20, 70)  # the paper's claim: MSE < 0.001 for A in [20, 70] (and L in [2, 20])
PAPER_CLAIM = 0.001
PAPER_LENGTHS = (2, 20)
ACCEPT_RATIO = 1.5  # acceptance: the MetaVAE's MSE over REGION at most this times Bayes' (and below the VAE's)
FLOOR_EXAMPLES = (20, 30)  # angles whose censoring floor the report quotes


@config
class PhysicsConfig:
    train_samples: int = 1000  # simulations per training simulator (the reference's count)
    val_samples: int = 1000
    test_samples: int = 1000  # queries per test simulator (the reference's count)
    eval_pool: int = 1000  # separate observations per test simulator that evaluation contexts are drawn from
    eval_contexts: int = 20  # context sets per test simulator, each shared by test_samples / eval_contexts queries
    # |D| 256 observed times of the same simulator (no friction values), 64 queries per simulator and step
    train: TrainConfig = point_cloud_train(context_size=256, batch_size=64, epochs=8,
                                           steps_per_epoch=300, lr=1e-3, grad_clip=10.0)
    hidden: tuple = (64, 64)
    summary: tuple = (64, 64, 64)
    query: tuple = setting((), empty=True, help="optional MLP on the query features before the head")
    standardize: bool = True  # 1/t^2 standardised on the context's sliding boxes (see StandardizeOnContext)
    baseline_epochs: int = 8  # the single-simulator baseline trains this long with the same steps
    # earlier names, still read from --set and from metrics.json (TrainConfig.context_pool is a training pool)
    ALIASES: typing.ClassVar[dict] = {"context_pool": "eval_pool"}


EVALUATION_ONLY = ("epochs", "baseline_epochs", "test_samples", "eval_contexts")  # a resume may change these
PRESETS = {
    "quick": PhysicsConfig(),
    "paper": PhysicsConfig(epochs=30, baseline_epochs=30, lr=5e-4),
}


# ----------------------------------------------------------------------------- inputs
def features(x: torch.Tensor) -> torch.Tensor:
    """Observed times (...) -> features (..., 2): [1 / t^2 (0 if censored), censored flag].

    For a sliding box 1/t^2 ~ a / (2L) is affine in the friction (a = g sin A - g cos A mu), up to
    the Euler step and the noise; a censored time (1e5, no time at all) becomes the flag.
    """
    censored = x == P.CENSORED_TIME
    inv_sq = torch.where(censored, torch.zeros_like(x), x.clamp(min=1e-3) ** -2)
    return torch.stack([inv_sq, censored.to(inv_sq.dtype)], dim=-1).float()


def build_physics_model(cfg: PhysicsConfig, data: MetaDataset | None = None):
    """The MetaVAE (``data=None``) or the no-context baseline standardised on ``data``."""
    if data is None:
        pre = StandardizeOnContext() if cfg.standardize else None
        return build_compiled_inference(2, z_dim=1, hidden_widths=cfg.hidden, summary_widths=cfg.summary,
                                        query=cfg.query or None, preprocess=pre)
    part = data.part("train")
    v = part.data[..., 0][part.data[..., 1] == 0]
    return build_compiled_inference(2, z_dim=1, hidden_widths=cfg.hidden, summary_widths=None, query=cfg.query or None,
                                    preprocess=FixedStandardize(v.mean(), v.std()))


def simulator_dataset(sims, cfg: PhysicsConfig, gen: torch.Generator) -> MetaDataset:
    n = cfg.train_samples + cfg.val_samples
    x, mu, _ = P.simulate_many(sims, n, gen)
    feats, labels = features(x), mu.unsqueeze(-1)
    cut = cfg.train_samples
    return MetaDataset.from_parts(
        train=list(feats[:, :cut]), val=list(feats[:, cut:]),
        train_labels=list(labels[:, :cut]), val_labels=list(labels[:, cut:]),
        names=[f"L={L},A={A}" for L, A in sims],
    )


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model, x: torch.Tensor, pool: torch.Tensor | None, context_size: int, n_sets: int,
            gen: torch.Generator) -> torch.Tensor:
    """Posterior means (S, n) for queries x (S, n) of S simulators. The n queries of a simulator are
    split into ``n_sets`` groups, each sharing one context set of ``context_size`` observations drawn
    without replacement from that simulator's ``pool`` (S, m) of other observations."""
    S, n = x.shape
    fx = features(x)
    if not model.uses_context:
        return model.embed(fx).squeeze(-1)
    if n % n_sets:
        raise ValueError(f"test_samples ({n}) must be a multiple of eval_contexts ({n_sets})")
    idx = torch.rand(S, n_sets, pool.shape[1], generator=gen).argsort(-1)[..., :context_size]
    ctx = features(torch.gather(pool.unsqueeze(1).expand(-1, n_sets, -1), 2, idx))  # (S, G, N, 2)
    q = fx.reshape(S, n_sets, n // n_sets, 2)
    return model.embed(q, ctx.unsqueeze(2)).reshape(S, n)


def bayes_posterior_means(x: torch.Tensor, sims) -> torch.Tensor:
    return torch.stack([P.posterior_mean(x[k].double(), L, A) for k, (L, A) in enumerate(sims)]).float()


def region_mask(sims, region=REGION) -> np.ndarray:
    return np.array([region[0] <= A <= region[1] for _, A in sims])


def run(cfg: PhysicsConfig, out: Path, device: str = "cpu", seed: int = 0, progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)
    meta_data = simulator_dataset(P.TRAIN_SIMULATORS, cfg, gen)
    base_data = simulator_dataset([P.BASELINE_SIMULATOR], cfg, gen)
    # Test simulations come from their own stream, so they do not depend on the training settings.
    tgen = torch.Generator().manual_seed(seed + 10_000)
    sims = P.TEST_SIMULATORS
    tx, tmu, _ = P.simulate_many(sims, cfg.test_samples, tgen)
    pool, _, _ = P.simulate_many(sims, cfg.eval_pool, tgen)

    seed_everything(seed + 1)
    meta = train_shared("physics", "metavae", build_physics_model(cfg), meta_data, cfg, out, device, seed, progress,
                        evaluation_only=EVALUATION_ONLY)
    seed_everything(seed + 2)
    vae = train_shared("physics", "vae", build_physics_model(cfg, base_data), base_data, cfg, out, device, seed,
                       progress, epochs=cfg.baseline_epochs, evaluation_only=EVALUATION_ONLY)
    train_seconds = time.time() - t0

    per_sim = _per_simulator_mse(meta, vae, cfg, tx, tmu, pool, seed)
    metrics = {
        **_summaries(sims, per_sim),
        "clipped_to_prior": [P.MU_LOW, P.MU_HIGH],
        "grid": [[int(L), int(A), float(per_sim["metavae"][i]), float(per_sim["vae"][i]), float(per_sim["bayes"][i])]
                 for i, (L, A) in enumerate(sims)],
        "grid_columns": ["L", "A", "metavae", "vae", "bayes"],
        "censored_floor": {str(A): _floor(A) for A in sorted({A for _, A in sims})},
        "paper": {"claim": f"MSE < {PAPER_CLAIM} for A in [{REGION[0]}, {REGION[1]}], L in [{PAPER_LENGTHS[0]}, "
                           f"{PAPER_LENGTHS[1]}]"},
        "config": config_dict(cfg),
        "seed": seed,
        "device": str(dev),
        "train_seconds": round(train_seconds, 1),
    }
    write_metrics(out, metrics)
    _figures(out, sims, per_sim)
    write_report(out, _report(metrics))
    return metrics


def _per_simulator_mse(meta, vae, cfg: PhysicsConfig, tx, tmu, pool, seed: int) -> dict:
    """Each estimator's MSE of the friction per test simulator (numpy, float64)."""
    egen = torch.Generator().manual_seed(seed + 20_000)
    # Posterior means of mu lie in the prior's support, so the amortized estimates are clipped to it;
    # "prior_mean" always guesses the prior's mean: a control any inference must beat.
    clip = lambda p: p.clamp(P.MU_LOW, P.MU_HIGH)  # noqa: E731
    preds = {
        "metavae": clip(predict(meta, tx, pool, cfg.context_size, cfg.eval_contexts, egen)),
        "vae": clip(predict(vae, tx, None, cfg.context_size, cfg.eval_contexts, egen)),
        "prior_mean": torch.full_like(tmu, (P.MU_LOW + P.MU_HIGH) / 2),
        "bayes": bayes_posterior_means(tx, P.TEST_SIMULATORS),
    }
    return {k: ((p - tmu) ** 2).mean(1).double().numpy() for k, p in preds.items()}


def _summaries(sims, per_sim: dict) -> dict:
    """Mean MSEs and their ratios to Bayes over all test simulators, the claim's angles, the unseen
    ones, and the acceptance check; the metrics.json blocks the report reads."""
    def summary(sel):
        mse = {k: float(v[sel].mean()) for k, v in per_sim.items()}
        ratio = {k: mse[k] / mse["bayes"] for k in ("metavae", "vae", "prior_mean")}
        return mse, ratio

    mask = region_mask(sims)
    mse, ratio = summary(np.ones(len(sims), dtype=bool))
    r_mse, r_ratio = summary(mask)
    trained = np.array([(L, A) in set(P.TRAIN_SIMULATORS) for L, A in sims])
    u_mse, u_ratio = summary(mask & ~trained)
    all_u_mse, all_u_ratio = summary(~trained)
    return {
        "mse": mse,
        "ratio_to_bayes": ratio,
        "region": {"A": list(REGION), "mse": r_mse, "ratio_to_bayes": r_ratio,
                   "pass": bool(r_ratio["metavae"] <= ACCEPT_RATIO and r_mse["metavae"] < r_mse["vae"])},
        "region_unseen_only": {"A": list(REGION), "mse": u_mse, "ratio_to_bayes": u_ratio},
        "unseen_only": {"simulators": int((~trained).sum()), "mse": all_u_mse, "ratio_to_bayes": all_u_ratio},
        "simulators": {"test": len(sims), "of_which_training": int(trained.sum())},
    }


# ----------------------------------------------------------------------------- figures and report
def _floor(A: float) -> float:
    """The censoring floor, with the rounding residue of tan(45 deg) = 0.999... shown as 0."""
    f = P.censored_mse_floor(A)
    return 0.0 if f < 1e-12 else f


def _as_grid(sims, values) -> np.ndarray:
    Ls = sorted({L for L, _ in sims})
    As = sorted({A for _, A in sims})
    g = np.full((len(Ls), len(As)), np.nan)
    for (L, A), v in zip(sims, values):
        g[Ls.index(L), As.index(A)] = v
    return g


def _figures(out: Path, sims, per_sim: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    Ls = sorted({L for L, _ in sims})
    As = sorted({A for _, A in sims})
    grids = {k: _as_grid(sims, v) for k, v in per_sim.items()}
    vmin = max(min(np.nanmin(g) for g in grids.values()), 1e-6)
    vmax = max(np.nanmax(g) for g in grids.values())
    norm = LogNorm(vmin=vmin, vmax=vmax)
    titles = {"metavae": "MetaVAE (25 simulators, context D)", "vae": "VAE (one simulator, L=10, A=45)",
              "bayes": "Bayes-optimal (exact posterior mean)"}
    fig, axes = plt.subplots(1, 3, figsize=(18, 6))
    fig.subplots_adjust(left=0.04, right=0.9, wspace=0.18, top=0.85)
    for ax, key in zip(axes, ("metavae", "vae", "bayes")):
        im = ax.imshow(grids[key], origin="lower", cmap="viridis_r", norm=norm, aspect="auto",
                       extent=(As[0] - 2.5, As[-1] + 2.5, Ls[0] - 0.5, Ls[-1] + 0.5))
        for L, A in P.TRAIN_SIMULATORS:
            ax.add_patch(Rectangle((A - 2.5, L - 0.5), 5, 1, fill=False, ec="white", lw=0.8))
        ax.axvline(REGION[0] - 2.5, color="red", ls="--", lw=1)
        ax.axvline(REGION[1] + 2.5, color="red", ls="--", lw=1)
        ax.set_title(f"{titles[key]}\nmean MSE {np.nanmean(grids[key]):.4f}")
        ax.set_xlabel("angle A (degrees)")
        ax.set_ylabel("length L")
        ax.set_xticks(As[::2])
        ax.set_yticks([L for L in Ls if L == 1 or L % 3 == 0])
    fig.colorbar(im, cax=fig.add_axes((0.92, 0.11, 0.012, 0.74)),
                 label="MSE of friction (one log colour scale; lighter is better)")
    fig.suptitle("Friction MSE on 304 simulators (white boxes: the 25 training simulators; red: A in [20, 70])")
    save_figure(fig, out / "heatmaps.png")

    fig, ax = plt.subplots(figsize=(7.5, 6))
    ratio = grids["metavae"] / grids["bayes"]
    im = ax.imshow(ratio, origin="lower", cmap="magma_r", norm=LogNorm(vmin=1, vmax=max(2.0, np.nanmax(ratio))),
                   aspect="auto", extent=(As[0] - 2.5, As[-1] + 2.5, Ls[0] - 0.5, Ls[-1] + 0.5))
    for L, A in P.TRAIN_SIMULATORS:
        ax.add_patch(Rectangle((A - 2.5, L - 0.5), 5, 1, fill=False, ec="tab:blue", lw=0.8))
    ax.set_xticks(As[::2])
    ax.set_yticks([L for L in Ls if L == 1 or L % 3 == 0])
    ax.set_xlabel("angle A (degrees)")
    ax.set_ylabel("length L")
    ax.set_title("MetaVAE MSE / Bayes-optimal MSE (1 = optimal)")
    fig.colorbar(im, ax=ax)
    save_figure(fig, out / "ratio_to_bayes.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, style in (("metavae", "-o"), ("vae", "--s"), ("bayes", "-k")):
        ax.semilogy(As, np.nanmean(grids[key], axis=0), style, label=key, ms=4)
    ax.semilogy(As, [_floor(A) or np.nan for A in As], ":", color="grey", label="censoring floor")
    ax.axhline(PAPER_CLAIM, color="red", lw=0.8, ls="--", label="paper's claim (< 0.001)")
    ax.axvspan(*REGION, color="green", alpha=0.08)
    ax.set_xlabel("angle A (degrees)")
    ax.set_ylabel("MSE, mean over L = 1..19")
    ax.legend()
    save_figure(fig, out / "mse_vs_angle.png")


def _report(m: dict) -> str:
    """report.md from metrics.json alone (templates/physics.md), so a committed result rebuilds it."""
    cfg = config_from_dict(PhysicsConfig, m["config"])
    sims, per_sim = _grid(m)
    return render_report("physics", m=m, cfg=cfg, table=_results_table(m), by_angle=_angle_table(sims, per_sim),
                         plane=_plane(sims), train=_plane(P.TRAIN_SIMULATORS), base=P.BASELINE_SIMULATOR,
                         counts=_claim_counts(sims, per_sim), accept=ACCEPT_RATIO, region=REGION, claim=PAPER_CLAIM,
                         lengths=PAPER_LENGTHS, verdict="holds" if m["region"]["pass"] else "does NOT hold",
                         floors=[(A, P.censored_mse_floor(A)) for A in FLOOR_EXAMPLES], mu=(P.MU_LOW, P.MU_HIGH),
                         dt=P.DT, noise=P.NOISE_STD, censored=sci(P.CENSORED_TIME),
                         summary=list(cfg.summary), hidden=list(cfg.hidden),
                         queries_per_set=cfg.test_samples // cfg.eval_contexts)


def _grid(m: dict):
    """The test simulators and their per-simulator MSEs, as metrics.json's ``grid`` holds them."""
    sims = [(L, A) for L, A, *_ in m["grid"]]
    cols = m["grid_columns"]
    per_sim = {k: np.array([row[cols.index(k)] for row in m["grid"]]) for k in cols[2:]}
    return sims, per_sim


def _plane(sims) -> types.SimpleNamespace:
    """How many simulators, and their lengths and angles as ranges and as lists, in the report's words."""
    Ls, As = sorted({L for L, _ in sims}), sorted({A for _, A in sims})
    return types.SimpleNamespace(n=len(sims), lengths=f"{Ls[0]}..{Ls[-1]}", angles=f"{As[0]}..{As[-1]}",
                                 angle_step=As[1] - As[0], length_list=", ".join(map(str, Ls)),
                                 angle_list=", ".join(map(str, As)))


def _results_table(m: dict) -> str:
    def row(name, block):
        return [name, block["mse"]["metavae"], block["mse"]["vae"], block["mse"]["prior_mean"], block["mse"]["bayes"],
                block["ratio_to_bayes"]["metavae"], block["ratio_to_bayes"]["vae"]]

    headers = ["simulators", "MetaVAE MSE", "VAE MSE", "prior mean MSE", "Bayes MSE", "MetaVAE / Bayes", "VAE / Bayes"]
    n_train, region = m["simulators"]["of_which_training"], f"A in [{REGION[0]}, {REGION[1]}]"
    n_region = int(region_mask([(L, A) for L, A, *_ in m["grid"]]).sum())
    return markdown_table(headers, [row(f"all {m['simulators']['test']} (incl. the {n_train} training simulators)", m),
                                    row(f"all unseen ({m['unseen_only']['simulators']})", m["unseen_only"]),
                                    row(f"{region} ({n_region})", m["region"]),
                                    row(f"{region}, unseen only", m["region_unseen_only"])])


def _angle_table(sims, per_sim) -> str:
    """Per angle, the mean MSE over the lengths, beside the censoring floor."""
    As = sorted({A for _, A in sims})
    grids = {k: _as_grid(sims, v) for k, v in per_sim.items()}
    return markdown_table(["A", "MetaVAE", "VAE", "Bayes", "censoring floor"],
                          [[A, float(np.nanmean(grids["metavae"][:, j])), float(np.nanmean(grids["vae"][:, j])),
                            float(np.nanmean(grids["bayes"][:, j])), _floor(A)] for j, A in enumerate(As)])


def _claim_counts(sims, per_sim) -> types.SimpleNamespace:
    """Of the simulators the paper's claim covers, how many are below its MSE: Bayes, MetaVAE, both."""
    covered = [i for i, (L, A) in enumerate(sims)
               if REGION[0] <= A <= REGION[1] and PAPER_LENGTHS[0] <= L <= PAPER_LENGTHS[1]]
    below = {k: {i for i in covered if per_sim[k][i] < PAPER_CLAIM} for k in ("bayes", "metavae")}
    return types.SimpleNamespace(claim=len(covered), bayes=len(below["bayes"]), metavae=len(below["metavae"]),
                                 both=len(below["bayes"] & below["metavae"]))


EXPERIMENT = Experiment(name="physics", description=DESCRIPTION, presets=PRESETS, run=run, options=OPTIONS)
