"""A scikit-learn estimator around `metavae train` / `embed`, so an embedding can sit in a Pipeline.

Why: a practitioner's tooling (cross-validation, pipelines, grid search) speaks scikit-learn. The
estimator takes the rows X and a ``groups`` array naming each row's distribution, as scikit-learn's
group-aware splitters do; training and embedding are exactly the command line's.
"""
from __future__ import annotations

import tempfile

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin


def _family(X, groups):
    from .data.files import Family

    X = np.asarray(X)
    if X.ndim < 2:
        raise ValueError(f"X must be rows of points (n, features), got shape {X.shape}")
    groups = np.zeros(len(X), dtype=int) if groups is None else np.asarray(groups)
    if len(groups) != len(X):
        raise ValueError(f"groups has {len(groups)} entries for {len(X)} rows of X")
    names = [str(g) for g in np.unique(groups)]
    rows = [np.flatnonzero(groups.astype(str) == n) for n in names]
    return Family(names, [X[r] for r in rows]), rows


class MetaVAEEmbedding(TransformerMixin, BaseEstimator):
    """``fit(X, groups=g)`` trains a model (default the MetaVAE) on the distributions named by ``g``;
    ``transform(X, groups=g)`` returns each row's posterior mean, given a context set drawn from
    the rows of its own group (``groups=None``: all rows are one distribution). In a Pipeline pass
    the groups as ``pipe.fit(X, y, embed__groups=g)``."""

    def __init__(self, model: str = "metavae", z_dim: int = 4, epochs: int = 20, batch_size: int = 32,
                 context_size: int = 10, lr: float = 1e-3, hidden_widths=(128, 128), summary_widths=(128, 128),
                 likelihood: str = "auto", scale: str = "auto", pooling: str = "mean", seed: int = 0,
                 device: str = "cpu"):
        self.model, self.z_dim, self.epochs, self.batch_size = model, z_dim, epochs, batch_size
        self.context_size, self.lr, self.hidden_widths, self.summary_widths = context_size, lr, hidden_widths, \
            summary_widths
        self.likelihood, self.scale, self.pooling, self.seed, self.device = likelihood, scale, pooling, seed, device

    def fit(self, X, y=None, groups=None):
        from .settings import check_settings, flat
        from .workflows import FileTrainConfig, load_fitted, train_family

        family, _ = _family(X, groups)
        cfg = FileTrainConfig(epochs=self.epochs, batch_size=self.batch_size, context_size=self.context_size,
                              lr=self.lr, z_dim=self.z_dim, hidden_widths=tuple(self.hidden_widths),
                              summary_widths=tuple(self.summary_widths), likelihood=self.likelihood,
                              scale=self.scale, seed=self.seed)
        check_settings(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            self.metrics_ = train_family(family, tmp, self.model, cfg, progress=False, pooling=self.pooling,
                                         device=self.device)
            self.model_, self.scaler_ = load_fitted(f"{tmp}/model.pt", self.device)
        self.settings_ = flat(cfg)
        self.n_features_in_ = int(np.prod(np.asarray(X).shape[1:]))
        return self

    def transform(self, X, groups=None):
        from sklearn.utils.validation import check_is_fitted

        from .workflows import embed_family

        check_is_fitted(self, "model_")
        family, rows = _family(X, groups)
        z = embed_family(self.model_, self.scaler_, family, seed=self.seed)
        out = np.empty((len(np.asarray(X)), z[0].shape[1]), dtype=np.float32)
        for r, zk in zip(rows, z):
            out[r] = zk
        return out

    def fit_transform(self, X, y=None, groups=None):
        return self.fit(X, y, groups).transform(X, groups)
