"""Experiment: the inference gap on seen and unseen distributions, measured against exact posteriors,
and how much of it inference-time refinement closes (docs/gap.md).

Three families whose exact posterior is known, each with models amortized over more and more
distributions (a no-context VAE on one distribution is the control):
  * mog: z in {0, 1} under the true mixture; KL(q || exact) and log p(x) - ELBO (equal: §1);
  * expfam: the known likelihoods, 2-D latent; log p(x) by quadrature, the best Gaussian q per point
    by optimisation, hence the approximation and amortization gaps (§2);
  * physics: the exact friction posterior against the amortized Gaussian, in KL(p || q) (§1).
The models are trained by the existing experiments' code (same data streams, seeds and run
identities as `metavae run mog`, `expfam-*` and `physics`); each is trained once and every gap is
measured from it. Refinement (§3) and a learned update (§4) start from the amortized q.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import exponential_families as expfam_data
from .data import mog as mog_data
from .data import physics as physics_data
from ..data.meta import MetaDataset
from ..distributions import CategoricalLatent, gaussian_kl, gaussian_log_prob
from ..objectives import elbo_of
from ..refine import GaussHermiteLatent, GradientEncoder, iterate, iterate_learned, refine, train_gradient_encoder
from ..training import resolve_device, seed_everything
from . import expfam, mog, physics
from .base import Experiment
from .common import config_dict, markdown_table, render_report, train_shared, write_metrics, write_report
from ..plots import save_figure
from ..settings import check_settings

DESCRIPTION = "Inference gap of MetaVAEs on seen vs unseen distributions against exact posteriors, and refinement"
OPTIONS: set[str] = set()
PARTS = ("mog", "expfam", "physics")
LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)  # Adam step sizes refinement chooses from (§3)


@dataclass(frozen=True)
class GapConfig:
    parts: str = "mog,expfam,physics"  # comma-separated subset of PARTS
    refine_steps: tuple = (1, 10, 100)  # gradient evaluations at which refinement is scored
    refine_lr: float | None = None  # Adam step size; None: per model and k, the best of LR_GRID on training points
    # mixtures of Gaussians: models as `metavae run mog` trains them
    mog_train_mixtures: tuple = (10, 20, 50)
    mog_epochs: int = 5
    mog_steps_per_epoch: int = 300
    mog_unseen_mixtures: int = 200
    mog_points: int = 50  # query points per mixture (seen and unseen), each mixture with its own context set
    # exponential families: models as `metavae run expfam-single / expfam-many` train them
    expfam_families: str = "gaussian,exponential"  # families evaluated with 1 / d / 3d distributions
    expfam_distributions_per_family: int = 30  # d
    expfam_epochs: int = 10
    expfam_steps_per_epoch: int = 200
    expfam_unseen_distributions: int = 30  # per family, fresh parameters from the meta-train prior
    expfam_queries: int = 10  # random vectors per distribution
    best_steps: int = 800  # Adam steps for the best Gaussian q per point (four stages of falling step size)
    hermite_points: int = 24  # Gauss-Hermite points per coordinate for E_q
    grid_points: int = 401  # quadrature points per coordinate for log p(x)
    learned_iters: int = 300  # training iterations of the learned update (gradient encoding)
    learned_unroll: int = 5
    # physics: models as `metavae run physics` trains them
    physics_epochs: int = 8
    physics_steps_per_epoch: int = 300
    physics_queries: int = 40  # observations per test simulator

    def check(self) -> None:
        _names(self.parts, PARTS, "parts")
        _names(self.expfam_families, expfam_data.TRAIN_FAMILIES, "expfam_families")
        if self.grid_points < 2:
            raise ValueError(f"setting 'grid_points' must be >= 2, got {self.grid_points}")


def _names(text: str, known, key: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names or len(set(names)) < len(names) or any(n not in known for n in names):
        raise ValueError(f"setting '{key}' must list distinct names from {', '.join(known)} separated by commas, "
                         f"got {text!r}")
    return names


PRESETS = {
    "quick": GapConfig(),
    "long": GapConfig(mog_epochs=20, mog_unseen_mixtures=1000, expfam_families="gaussian,lognormal,exponential",
                      expfam_epochs=20, expfam_steps_per_epoch=500, best_steps=2000, physics_epochs=30,
                      physics_queries=100, learned_iters=1000),
}


# ----------------------------------------------------------------------------- measuring tools
def log_marginal_grid(log_joint, lo: torch.Tensor, hi: torch.Tensor, n: int) -> tuple:
    """log of the integral of exp(log_joint(z)) over the box [lo, hi] (..., d), by the trapezoid rule on
    an n^d product grid; ``log_joint`` maps z (..., n^d, d) to (..., n^d). Also returns the largest
    log-density on the box's boundary minus the largest inside: far below 0 when the box holds the mass."""
    d = lo.shape[-1]
    u = torch.linspace(0, 1, n, dtype=lo.dtype)
    w = torch.ones(n, dtype=lo.dtype)
    w[0] = w[-1] = 0.5
    unit = torch.cartesian_prod(*[u] * d).reshape(-1, d)
    log_w = torch.cartesian_prod(*[w.log()] * d).reshape(-1, d).sum(-1)
    z = lo.unsqueeze(-2) + (hi - lo).unsqueeze(-2) * unit
    f = log_joint(z)
    log_cell = torch.log((hi - lo) / (n - 1)).sum(-1)
    edge = ((unit == 0) | (unit == 1)).any(-1)
    return torch.logsumexp(f + log_w, -1) + log_cell, f[..., edge].amax(-1) - f.amax(-1)


def mog_log_joint(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """log p(x, z = k) under the true mixture (equal weights): x (M, n, 2), means (M, 2, 2) -> (M, n, 2)."""
    logvar = torch.full_like(means, math.log(mog_data.VARIANCE)).unsqueeze(1)
    return math.log(0.5) + gaussian_log_prob(x.unsqueeze(-2), means.unsqueeze(1), logvar)


def mog_log_lik(x: torch.Tensor, means: torch.Tensor):
    """log p(x | z) under the true mixture, for one-hot z (M, n, S, 2): the likelihood refinement uses."""
    def log_lik(z):
        centers = z @ means.unsqueeze(1)
        return gaussian_log_prob(x.unsqueeze(-2), centers, torch.full_like(centers, math.log(mog_data.VARIANCE)))
    return log_lik


def categorical_kl(logits: torch.Tensor, log_joint: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits) || exact posterior) per point, the posterior from log p(x, z) (..., K)."""
    log_q = logits.log_softmax(-1)
    return (log_q.exp() * (log_q - log_joint.log_softmax(-1))).sum(-1)


def forward_kl_gap(mean: torch.Tensor, var: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Amortization gap of a 1-D Gaussian q (params (..., 2): mean, log-variance) in KL(p || q), for a
    posterior p of this mean and variance: KL(p || q) - min over Gaussians = KL(N(mean, var) || q) (§1)."""
    return gaussian_kl(mean.unsqueeze(-1), var.log().unsqueeze(-1), params[..., :1], params[..., 1:])


def family_log_lik(family: str, x: torch.Tensor):
    """log p(x | z) of one coordinate's draws x (P, V) under a family, for z (P, S, 1) -> (P, S)."""
    fam = expfam_data.FAMILIES[family]
    return lambda z: fam.log_prob(x.unsqueeze(-2), z).sum(-1)


def best_gaussian(latent, params: torch.Tensor, log_lik, steps: int, n_samples: int = 1) -> tuple:
    """The best q of a Gaussian latent per point: Adam from ``params`` in four stages whose step size
    falls from 0.1 to 1e-4, each step's ELBO taken with ``n_samples`` draws (exact under
    `GaussHermiteLatent`). Returns the parameters and the largest ELBO gain of the last stage
    (about 0 once converged; with Monte Carlo draws it also holds their noise)."""
    before = None
    for lr in (1e-1, 1e-2, 1e-3, 1e-4):
        before = elbo_of(latent, params, log_lik, n_samples)
        params = refine(latent, params, log_lik, max(steps // 4, 1), lr, n_samples)
    return params, float((elbo_of(latent, params, log_lik, n_samples) - before).abs().max())


def pick_lr(latent, params: torch.Tensor, log_lik, ks, grid=LR_GRID) -> tuple[dict, dict]:
    """For each step count k in ``ks``, the Adam step size of ``grid`` whose k steps reach the highest
    mean ELBO: refinement at its best for each budget. Run on training points, then used for every
    model and split. Returns {k: lr} and the mean ELBOs {lr: {k: ELBO}}."""
    scores = {}
    for lr in grid:
        elbos, _, _ = _follow(iterate(latent, params, log_lik, max(ks), lr), ks,
                              lambda p: _mean(elbo_of(latent, p, log_lik)))
        scores[lr] = {k: v if math.isfinite(v) else -math.inf for k, v in elbos.items()}
    return {k: max(grid, key=lambda lr: scores[lr][k]) for k in ks}, scores


def _step_sizes(cfg: GapConfig, latent, params, log_lik) -> dict:
    """{k: Adam step size}: ``refine_lr`` if set, else `pick_lr` on these (training) points."""
    ks = sorted(set(cfg.refine_steps))
    return {k: cfg.refine_lr for k in ks} if cfg.refine_lr else pick_lr(latent, params, log_lik, ks)[0]


def _refined(latent, params, log_lik, lrs: dict, score) -> tuple[dict, dict, torch.Tensor]:
    """score(params) after k Adam steps at step size lrs[k], for each k; the seconds; the last params."""
    out, seconds = {}, {}
    for k, lr in sorted(lrs.items()):
        more, secs, last = _follow(iterate(latent, params, log_lik, k, lr), [k], score)
        out.update(more)
        seconds.update(secs)
    return out, seconds, last


def _follow(path, ks, score) -> tuple[dict, dict, torch.Tensor]:
    """score(params) after each step count in ``ks`` along ``path``, the seconds the steps took, and
    the last parameters."""
    scores, seconds, spent, t = {}, {}, 0.0, time.perf_counter()
    for step, p in enumerate(path, 1):
        spent += time.perf_counter() - t
        if step in ks:
            scores[step], seconds[step] = score(p), round(spent, 4)
        if step >= max(ks):
            break
        t = time.perf_counter()
    return scores, seconds, p


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t, 4)


def _mean(v: torch.Tensor) -> float:
    return float(v.mean())


# ----------------------------------------------------------------------------- mixtures of Gaussians
def _mog_points(means, n: int, context_size: int, gen):
    x, _ = mog_data.sample_points(means, n + context_size, gen)
    return x[:, :n], x[:, n:]


def _mog_q(model, x, context, means) -> tuple:
    """Logits of q(z | D, x) for x (M, n, 2) and one context set per mixture (M, N, 2), the true
    likelihood, and the seconds the encoder took. The names of z's two values are arbitrary: each
    mixture takes the labelling with the higher ELBO under the true mixture."""
    logits, seconds = _timed(lambda: _encode(model, x, context.unsqueeze(1)))
    logits, lik, lat = logits.double(), mog_log_lik(x.double(), means.double()), CategoricalLatent(2)
    flip = elbo_of(lat, logits.flip(-1), lik).mean(1) > elbo_of(lat, logits, lik).mean(1)
    return torch.where(flip[:, None, None], logits.flip(-1), logits), lik, seconds, flip


def mog_gaps(model, x, context, means, lrs: dict) -> dict:
    """Gaps of q(z | D, x) against the true mixture's posterior, before and after refinement."""
    lat = CategoricalLatent(2)
    logits, lik, enc_s, flip = _mog_q(model, x, context, means)
    log_joint = mog_log_joint(x.double(), means.double())
    log_px = log_joint.logsumexp(-1)
    gap = lambda p: log_px - elbo_of(lat, p, lik)  # noqa: E731
    kl, amortized = categorical_kl(logits, log_joint), gap(logits)
    refined, seconds, _ = _refined(lat, logits, lik, lrs, lambda p: _mean(gap(p)))
    return {"points": x.shape[0] * x.shape[1], "kl": _mean(kl), "elbo_gap": _mean(amortized),
            "kl_minus_elbo_gap_max_abs": float((kl - amortized).abs().max()),
            "exact_q_gap_max_abs": float(gap(log_joint).abs().max()), "relabelled_fraction": _mean(flip.double()),
            "refined": refined, "refine_seconds": seconds, "encode_seconds": enc_s}


@torch.no_grad()
def _encode(model, x, context):
    return model.encode(x, context if model.uses_context else None)


def _mog(cfg: GapConfig, out: Path, device: str, seed: int, progress: bool) -> dict:
    mcfg = dataclasses.replace(mog.PRESETS["quick"], train_mixtures=cfg.mog_train_mixtures, epochs=cfg.mog_epochs,
                               steps_per_epoch=cfg.mog_steps_per_epoch)
    t0 = time.time()
    # Training data and models exactly as `metavae run mog` draws and trains them.
    gen = torch.Generator().manual_seed(seed)
    sizes = sorted(mcfg.train_mixtures)
    means = mog_data.sample_means(max(sizes), gen)
    x, y = mog_data.sample_points(means, mcfg.points_per_mixture, gen)
    models = {}
    for i, k in enumerate(sizes):
        seed_everything(seed + 1 + i)
        data = MetaDataset(list(x[:k]), labels=list(y[:k]), seed=seed)
        model = mog.build_mog_model(data.part("train").data, mcfg, True)
        models[f"metavae_{k}"] = (k, train_shared("mog", f"metavae_{k}", model, data, mcfg, out, device, seed, progress,
                                                  evaluation_only=mog.EVALUATION_ONLY))
    seed_everything(seed)
    data = MetaDataset([x[0]], labels=[y[0]], seed=seed)
    vae = mog.build_mog_model(data.part("train").data, mcfg, False)
    models["vae"] = (1, train_shared("mog", "vae", vae, data, mcfg, out, device, seed, progress,
                                     evaluation_only=mog.EVALUATION_ONLY))
    train_s = time.time() - t0
    # Evaluation points from their own stream: fresh points of the training mixtures, and new mixtures.
    egen = torch.Generator().manual_seed(seed + 30_000)
    seen_x, seen_ctx = _mog_points(means, cfg.mog_points, mcfg.context_size, egen)
    unseen_means = mog_data.sample_means(cfg.mog_unseen_mixtures, egen)
    unseen_x, unseen_ctx = _mog_points(unseen_means, cfg.mog_points, mcfg.context_size, egen)
    tune_x, tune_ctx = _mog_points(means, cfg.mog_points, mcfg.context_size, egen)  # for step sizes only
    result = {}
    for name in ["vae"] + [f"metavae_{k}" for k in sizes]:
        k, model = models[name]
        logits, lik, _, _ = _mog_q(model, tune_x[:k], tune_ctx[:k], means[:k])
        lrs = _step_sizes(cfg, CategoricalLatent(2), logits, lik)
        result[name] = {"distributions": k, "refine_lr": lrs,
                        "seen": mog_gaps(model, seen_x[:k], seen_ctx[:k], means[:k], lrs),
                        "unseen": mog_gaps(model, unseen_x, unseen_ctx, unseen_means, lrs)}
    return {"models": result, "train_seconds": round(train_s, 1),
            "eval_seconds": round(time.time() - t0 - train_s, 1), "context_size": mcfg.context_size}


# ----------------------------------------------------------------------------- exponential families
def _coordinates(params: torch.Tensor, q: torch.Tensor) -> tuple:
    """Amortized q (..., 4) = (means, log-variances) and random vectors (..., V, 2) as 1-D problems, one
    per vector and coordinate: params (P, 2), draws (P, V). Prior, likelihood and q all factorise over
    the two coordinates, so the 2-D ELBO, log p(x) and best q are sums of 1-D ones (§2)."""
    mu, logvar = params.chunk(2, dim=-1)
    return (torch.stack([mu, logvar], -1).reshape(-1, 2).double(),
            q.transpose(-1, -2).reshape(-1, q.shape[-2]).double())


def expfam_gaps(params, q, family: str, cfg: GapConfig, lrs: dict, encoder: GradientEncoder | None = None) -> dict:
    """log p(x), the approximation gap (log p(x) - best Gaussian ELBO) and the amortization gap (best -
    amortized ELBO) per random vector (both coordinates), then the amortization gap left after k
    refinement steps (Adam, and the learned update when ``encoder`` is given)."""
    ks = sorted(set(cfg.refine_steps))
    p0, x = _coordinates(params, q)
    lat, lik = GaussHermiteLatent(1, cfg.hermite_points), family_log_lik(family, x)
    per_vector = lambda v: v.reshape(-1, 2).sum(-1)  # noqa: E731
    elbo = lambda p: per_vector(elbo_of(lat, p, lik))  # noqa: E731
    best, last_gain = best_gaussian(lat, p0, lik, cfg.best_steps)
    mu, sd = best[:, :1], torch.exp(0.5 * best[:, 1:])
    log_px, edge = log_marginal_grid(lambda z: gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z)) + lik(z),
                                     mu - 12 * sd, mu + 12 * sd, cfg.grid_points)
    log_px, e_best = per_vector(log_px), elbo(best)
    out = {"points": len(log_px), "log_px": _mean(log_px), "approximation_gap": _mean(log_px - e_best),
           "amortization_gap": _mean(e_best - elbo(p0)), "min_gap": float(torch.minimum(log_px - e_best,
                                                                                        e_best - elbo(p0)).min()),
           "best_last_stage_gain_max": last_gain, "grid_edge_max": float(edge.max())}
    score = lambda p: _mean(e_best - elbo(p))  # noqa: E731
    out["refined"], out["refine_seconds"], last = _refined(lat, p0, lik, lrs, score)
    out["refined_above_best"] = _mean((elbo(last) > e_best + 1e-6).double())  # > 0: the best q is not the best
    if encoder is not None:
        out["learned"], out["learned_seconds"], _ = _follow(iterate_learned(encoder, lat, p0, lik, max(ks)), ks, score)
    return out


def _training_problems(model, family: str, params, n: int, context_size: int, cfg: GapConfig, gen) -> tuple:
    """(latent, amortized params, likelihood) of ``n`` fresh random vectors per training distribution
    ``params`` of ``model`` (for tuning only: none of them is evaluated)."""
    q, ctx = expfam.draw_queries(family, params, n, context_size, gen)
    p0, x = _coordinates(_encode(model, q, ctx), q)
    return GaussHermiteLatent(1, cfg.hermite_points), p0, family_log_lik(family, x)


def _learned_update(problems: tuple, cfg: GapConfig) -> tuple:
    """A gradient encoder fitted on training problems, and how its fit went."""
    encoder, t = GradientEncoder(2).double(), time.time()
    losses = train_gradient_encoder(encoder, *problems, cfg.learned_iters, cfg.learned_unroll)
    return encoder, {"loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                     "seconds": round(time.time() - t, 1)}


def _expfam(cfg: GapConfig, out: Path, device: str, seed: int, progress: bool) -> dict:
    ecfg = dataclasses.replace(expfam.PRESETS["quick"], distributions_per_family=cfg.expfam_distributions_per_family,
                               epochs=cfg.expfam_epochs, steps_per_epoch=cfg.expfam_steps_per_epoch)
    families = _names(cfg.expfam_families, expfam_data.TRAIN_FAMILIES, "expfam_families")
    d = ecfg.distributions_per_family
    t0 = time.time()
    # Models as expfam-many (the model over every family) and expfam-single (one family; a VAE) train them.
    sets = expfam.build_training_sets(ecfg, seed)
    seed_everything(seed)
    many = expfam.train_metavae("metavae_many", list(expfam_data.TRAIN_FAMILIES), sets, ecfg, out, device, seed,
                                progress)
    models = {}
    for i, f in enumerate(expfam_data.TRAIN_FAMILIES):
        if f in families:
            seed_everything(seed + 1 + i)
            single = expfam.train_metavae(f"metavae_{f}", [f], sets, ecfg, out, device, seed, progress)
            seed_everything(seed + 11 + i)
            vae = expfam.train_vae(f"vae_{f}", f, sets, ecfg, out, device, seed, progress)
            models[f] = {f"vae_{f}": (1, vae, sets[f]["vae_params"]), f"metavae_{f}": (d, single, sets[f]["params"]),
                         "metavae_many": (len(expfam_data.TRAIN_FAMILIES) * d, many, sets[f]["params"])}
    train_s = time.time() - t0
    result, learned = {}, {}
    for i, f in enumerate(families):
        egen = torch.Generator().manual_seed(seed * 1000 + 700 + i)
        n_seen = cfg.expfam_queries * d  # vectors per split, the same for every model
        encoder, learned[f] = _learned_update(_training_problems(many, f, sets[f]["params"], cfg.expfam_queries,
                                                                 ecfg.context_size, cfg, egen), cfg)
        unseen = expfam_data.FAMILIES[f].prior_sample(cfg.expfam_unseen_distributions, egen)
        splits = {"unseen": expfam.draw_queries(f, unseen, cfg.expfam_queries, ecfg.context_size, egen)}
        for name, (k, model, params) in models[f].items():
            lrs = _step_sizes(cfg, *_training_problems(model, f, params, n_seen // len(params), ecfg.context_size,
                                                       cfg, egen))
            seen = expfam.draw_queries(f, params, n_seen // len(params), ecfg.context_size, egen)
            entry = result.setdefault(name, {"distributions": k, "families": {}, "refine_lr": {}})
            entry["refine_lr"][f] = lrs
            entry["families"][f] = {split: expfam_gaps(_encode(model, q, ctx), q, f, cfg, lrs, encoder)
                                    for split, (q, ctx) in {"seen": seen, **splits}.items()}
    return {"models": result, "learned_update": learned, "train_seconds": round(train_s, 1),
            "eval_seconds": round(time.time() - t0 - train_s, 1), "families": families}


# ----------------------------------------------------------------------------- physics
def _physics(cfg: GapConfig, out: Path, device: str, seed: int, progress: bool) -> dict:
    pcfg = dataclasses.replace(physics.PRESETS["quick"], epochs=cfg.physics_epochs, baseline_epochs=cfg.physics_epochs,
                               steps_per_epoch=cfg.physics_steps_per_epoch)
    t0 = time.time()
    # Data and models exactly as `metavae run physics` makes them.
    gen = torch.Generator().manual_seed(seed)
    meta_data = physics.simulator_dataset(physics_data.TRAIN_SIMULATORS, pcfg, gen)
    base_data = physics.simulator_dataset([physics_data.BASELINE_SIMULATOR], pcfg, gen)
    seed_everything(seed + 1)
    meta = train_shared("physics", "metavae", physics.build_physics_model(pcfg), meta_data, pcfg, out, device, seed,
                        progress, evaluation_only=physics.EVALUATION_ONLY)
    seed_everything(seed + 2)
    vae = train_shared("physics", "vae", physics.build_physics_model(pcfg, base_data), base_data, pcfg, out, device,
                       seed, progress, epochs=pcfg.baseline_epochs, evaluation_only=physics.EVALUATION_ONLY)
    train_s = time.time() - t0
    sims = physics_data.TEST_SIMULATORS
    tgen = torch.Generator().manual_seed(seed + 40_000)
    x, _, _ = physics_data.simulate_many(sims, cfg.physics_queries, tgen)
    pool, _, _ = physics_data.simulate_many(sims, pcfg.context_size, tgen)  # one context set per simulator
    moments = [physics_data.posterior_moments(x[k].double(), L, A) for k, (L, A) in enumerate(sims)]
    mean, var = torch.stack([m for m, _ in moments]), torch.stack([v for _, v in moments])
    fx, ctx = physics.features(x), physics.features(pool).unsqueeze(1)
    low, high = physics_data.MU_LOW, physics_data.MU_HIGH
    prior = torch.tensor([(low + high) / 2, math.log((high - low) ** 2 / 12)])
    qs = {"vae": (1, [physics_data.BASELINE_SIMULATOR], _encode(vae, fx, None)),
          "metavae": (len(physics_data.TRAIN_SIMULATORS), physics_data.TRAIN_SIMULATORS, _encode(meta, fx, ctx)),
          "prior": (0, physics_data.TRAIN_SIMULATORS, prior.expand(*x.shape, 2))}  # a control: split as the MetaVAE
    result = {}
    for name, (k, trained, params) in qs.items():
        gap = forward_kl_gap(mean, var, params.double())
        seen = torch.tensor([s in set(trained) for s in sims])[:, None].expand_as(gap)
        # unseen simulators inside the box of the training ones' lengths and angles (interpolation) or outside
        box = [(min(v), max(v)) for v in zip(*trained)]
        inside = torch.tensor([all(lo <= v <= hi for v, (lo, hi) in zip(s, box)) for s in sims])[:, None]
        result[name] = {"simulators": k}
        for split, mask in (("seen", seen), ("unseen", ~seen), ("unseen_inside", ~seen & inside),
                            ("unseen_outside", ~seen & ~inside)):
            g = gap[mask]
            ok = torch.isfinite(g)
            result[name][split] = None if not len(g) else {
                "points": int(ok.sum()), "non_finite": int((~ok).sum()), "mean": _mean(g[ok]),
                "median": float(g[ok].median()), "p90": float(g[ok].quantile(0.9))}
    return {"models": result, "train_seconds": round(train_s, 1), "eval_seconds": round(time.time() - t0 - train_s, 1)}


# ----------------------------------------------------------------------------- the experiment
def run(cfg: GapConfig, out: Path, device: str = "cpu", seed: int = 0, progress: bool = True) -> dict:
    check_settings(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    t0 = time.time()
    metrics = {}
    parts = {"mog": _mog, "expfam": _expfam, "physics": _physics}
    for name in _names(cfg.parts, PARTS, "parts"):
        metrics[name] = parts[name](cfg, out / name, device, seed, progress)
    metrics.update(answer=_answer(metrics), checks=_checks(metrics), config=config_dict(cfg), seed=seed,
                   device=str(dev), seconds=round(time.time() - t0, 1))
    write_metrics(out, metrics)
    _figure(out, metrics, cfg)
    write_report(out, _report(metrics, cfg))
    return metrics


def _by_breadth(models: dict, value) -> dict:
    """{split: {training distributions: value(model, split)}}, fewest distributions first."""
    rows = sorted(models.values(), key=lambda r: r["distributions"])
    return {s: {r["distributions"]: value(r, s) for r in rows if r[s] is not None} for s in ("seen", "unseen")}


def _answer(m: dict) -> dict:
    """The question of docs/gap.md: the amortization gap (mean nats per point) on seen and unseen
    distributions by the number of training distributions (1 = the no-context VAE)."""
    out = {}
    if "mog" in m:
        out["mog"] = _by_breadth(m["mog"]["models"], lambda r, s: r[s]["kl"])
    if "expfam" in m:
        for f in m["expfam"]["families"]:
            models = {n: {"distributions": r["distributions"], **r["families"][f]}
                      for n, r in m["expfam"]["models"].items() if f in r["families"]}
            out[f"expfam_{f}"] = _by_breadth(models, lambda r, s: r[s]["amortization_gap"])
    if "physics" in m:
        models = {n: {"distributions": r["simulators"], **r} for n, r in m["physics"]["models"].items() if n != "prior"}
        out["physics"] = _by_breadth(models, lambda r, s: r[s]["mean"])
        out["physics_median"] = _by_breadth(models, lambda r, s: r[s]["median"])
    for v in out.values():
        u = v["unseen"]
        n = sorted(u)
        v["unseen_ratio_broadest_to_fewest"] = u[n[-1]] / u[n[0]] if u[n[0]] > 0 else None
    return out


def _checks(m: dict) -> dict:
    """Numbers that must be ~0 (or >= 0) if the measurement is right (docs/gap.md §5)."""
    out = {}
    if "mog" in m:
        rows = [r[s] for r in m["mog"]["models"].values() for s in ("seen", "unseen")]
        out["mog_kl_minus_elbo_gap_max_abs"] = max(r["kl_minus_elbo_gap_max_abs"] for r in rows)
        out["mog_exact_q_gap_max_abs"] = max(r["exact_q_gap_max_abs"] for r in rows)
    if "expfam" in m:
        rows = [s for r in m["expfam"]["models"].values() for f in r["families"].values() for s in f.values()]
        out["expfam_min_gap"] = min(r["min_gap"] for r in rows)
        out["expfam_best_last_stage_gain_max"] = max(r["best_last_stage_gain_max"] for r in rows)
        out["expfam_grid_edge_max"] = max(r["grid_edge_max"] for r in rows)
        out["expfam_refined_above_best_max"] = max(r["refined_above_best"] for r in rows)
        if "gaussian" in m["expfam"]["families"]:  # a Gaussian posterior: the best Gaussian q is exact
            out["expfam_gaussian_approximation_gap_max"] = max(
                r["families"]["gaussian"][s]["approximation_gap"] for r in m["expfam"]["models"].values()
                if "gaussian" in r["families"] for s in ("seen", "unseen"))
    return out


# ----------------------------------------------------------------------------- figure and report
FLOOR = 1e-12  # plotted in place of gaps at or below 0 on the log scales


def _plot_value(v):
    return float("nan") if v is None else max(v, FLOOR)


def _figure(out: Path, m: dict, cfg: GapConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax = axes[0]
    for i, (part, v) in enumerate(p for p in m["answer"].items() if p[0] != "physics_median"):
        for split, ls, marker in (("seen", "--", "o"), ("unseen", "-", "s")):
            n = sorted(v[split])
            ax.plot(n, [_plot_value(v[split][k]) for k in n], ls=ls, marker=marker, color=colors[i % len(colors)],
                    label=f"{part}, {split}")
    ax.set(xscale="log", yscale="log", xlabel="training distributions (1: a VAE on one, no context)",
           ylabel="amortization gap (nats per point)", title="(a) amortization gap by amortization breadth")
    ax.legend(fontsize=7)
    ks = sorted(set(cfg.refine_steps))
    for ax, part, letter in ((axes[1], "mog", "b"), (axes[2], "expfam", "c")):
        if part not in m:
            ax.set_visible(False)
            continue
        lines = [(f"{name} {fam}".strip(), u) for name, r in m[part]["models"].items()
                 for fam, u in ({"": r["unseen"]} if part == "mog" else
                                {f: sp["unseen"] for f, sp in r["families"].items()}).items()]
        for i, (label, u) in enumerate(lines):
            start = u["kl"] if part == "mog" else u["amortization_gap"]
            for key, ls, marker in (("refined", "-", "o"), ("learned", ":", "x")):
                if key in u:
                    ax.plot([0] + ks, [_plot_value(start)] + [_plot_value(u[key][k]) for k in ks], ls=ls,
                            marker=marker, color=colors[i % len(colors)],
                            label=f"{label} {'Adam' if key == 'refined' else 'learned'}")
        ax.set(xscale="symlog", yscale="log", xlabel="refinement steps k (gradient evaluations)",
               ylabel="amortization gap left on unseen distributions", title=f"({letter}) {part}: refinement")
        ax.legend(fontsize=6)
    save_figure(fig, out / "gap.png")


def _fmt_lrs(lrs: dict) -> str:
    return " / ".join(f"{lr:g}" for _, lr in sorted(lrs.items()))


def _trend(values: dict) -> str:
    n = sorted(values)
    a, b = values[n[0]], values[n[-1]]
    change = f", x{b / a:.3g}" if a > 0 else ""
    return f"{'falls' if b < a else 'rises'} from {a:.4g} ({n[0]}) to {b:.4g} ({n[-1]}){change}"


def _answer_text(m: dict) -> str:
    lines = []
    for part, v in m["answer"].items():
        u, seen = v["unseen"], v["seen"]
        low = min(u, key=u.get)
        lines.append(f"- {part}: unseen {', '.join(f'{k}: {g:.4g}' for k, g in u.items())} (lowest with {low}; "
                     f"{_trend(u)}); seen {', '.join(f'{k}: {g:.4g}' for k, g in seen.items())}.")
    return "\n".join(lines)


def _steps_note(cfg: GapConfig) -> str:
    if cfg.refine_lr:
        return f"fixed at {cfg.refine_lr}"
    return (f"the best of {', '.join(f'{lr:g}' for lr in LR_GRID)} by the mean ELBO after k steps on fresh points of "
            "the model's own training distributions (last column)")


def _report(m: dict, cfg: GapConfig) -> str:
    """report.md: templates/gap.md, one section per part measured (templates/gap-PART.md), the checks.
    ``m`` as the run holds it or as metrics.json reads back (step counts as string keys)."""
    m = _int_keys(m)
    ks = sorted(set(cfg.refine_steps))
    parts = [render_report("gap", answer=_answer_text(m))]
    sections = {"mog": _mog_section, "expfam": _expfam_section, "physics": _physics_section}
    parts += [sections[p](m, cfg, ks) for p in PARTS if p in m]
    timing = ", ".join(f"{p}: training {m[p]['train_seconds']} s, evaluation {m[p]['eval_seconds']} s"
                       for p in PARTS if p in m)
    checks = markdown_table(["check", "value"], [[k, v] for k, v in m["checks"].items()])
    parts.append(render_report("gap-end", checks=checks, seconds=m["seconds"], timing=timing))
    return "\n".join(parts).rstrip()


def _int_keys(d):
    """``d`` with keys that are whole numbers written as strings (JSON's) read back as ints."""
    if not isinstance(d, dict):
        return d
    return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in d.items()}


def _mog_section(m: dict, cfg: GapConfig, ks: list) -> str:
    g = m["mog"]
    rows, cost = [], []
    for name, r in g["models"].items():
        for s in ("seen", "unseen"):
            x = r[s]
            rows.append([name, r["distributions"], s, x["points"], x["kl"], x["elbo_gap"],
                         *[x["refined"][k] for k in ks], _fmt_lrs(r["refine_lr"])])
            cost.append([name, s, x["encode_seconds"], *[x["refine_seconds"][k] for k in ks]])
    table = markdown_table(["model", "distributions", "split", "points", "KL(q || p)", "log p(x) - ELBO",
                            *[f"k={k}" for k in ks], "Adam lr per k"], rows)
    return render_report("gap-mog", g=g, checks=m["checks"], steps_note=_steps_note(cfg), table=table,
                         cost=markdown_table(["model", "split", "encode", *[f"k={k}" for k in ks]], cost))


def _expfam_section(m: dict, cfg: GapConfig, ks: list) -> str:
    g = m["expfam"]
    rows, cost = [], []
    for name, r in g["models"].items():
        for f, splits in r["families"].items():
            for s, x in splits.items():
                rows.append([name, r["distributions"], f, s, x["log_px"], x["approximation_gap"],
                             x["amortization_gap"], *[x["refined"][k] for k in ks],
                             *[x["learned"][k] for k in ks], _fmt_lrs(r["refine_lr"][f])])
                if s == "unseen":
                    cost.append([name, f, x["refine_seconds"][ks[-1]], x["learned_seconds"][ks[-1]]])
    fits = "; ".join(f"{f}: loss {t['loss_first']:.4g} -> {t['loss_last']:.4g} in {t['seconds']} s"
                     for f, t in g["learned_update"].items())
    table = markdown_table(["model", "distributions", "family", "split", "log p(x)", "approximation gap",
                            "amortization gap", *[f"Adam k={k}" for k in ks], *[f"learned k={k}" for k in ks],
                            "Adam lr per k"], rows)
    return render_report("gap-expfam", cfg=cfg, draws=expfam_data.VECTOR_SIZE, steps_note=_steps_note(cfg), fits=fits,
                         table=table, last_k=ks[-1], cost=markdown_table(["model", "family", "Adam", "learned"], cost))


def _physics_section(m: dict, cfg: GapConfig, ks: list) -> str:
    rows = [[name, r["simulators"], s, r[s]["points"], r[s]["non_finite"], r[s]["mean"], r[s]["median"],
             r[s]["p90"]] for name, r in m["physics"]["models"].items()
            for s in ("seen", "unseen", "unseen_inside", "unseen_outside") if r[s]]
    table = markdown_table(["model", "training simulators", "split", "points", "non-finite", "mean gap", "median gap",
                            "90th percentile"], rows)
    return render_report("gap-physics", context_size=physics.PRESETS["quick"].context_size, table=table)


EXPERIMENT = Experiment(name="gap", description=DESCRIPTION, presets=PRESETS, run=run, options=OPTIONS)
