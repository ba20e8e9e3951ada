"""Linear probes read from embeddings: the standardised probe as one batched solve.

The standardised probe standardises features on the train embeddings, picks C of an L2-penalised
multinomial logistic regression by 3-fold stratified cross-validation on those train embeddings
(the smaller C on ties), refits on the whole train set and scores the test set. scikit-learn does
that with 13 separate L-BFGS fits per problem; evaluating a run needs it for many problems (every
unseen value at every snapshot), so here every problem, fold and C is solved at once in torch:
every (problem, fold) a member of one zero-padded batch, warm-started along C, each solved by
L-BFGS in preconditioned variables. The two products with the N examples' features run in float32
(`PRECISION`, faster); weights, gradients, the objective's sum and the scores stay float64.
`sklearn_standardised_probe` is the scikit-learn original, kept to check agreement (tests,
benchmarks/rescore_probe.py).

Agreement is with scikit-learn *converged*: the original's fits (max_iter=300, tol=1e-4) stop short
of their own tolerance on real embeddings (300 of the ~1,100-1,700 steps scikit-learn needs at C=10
on a quick-preset MNIST run), which moved test accuracies by up to 0.01; this solve stops at that
tolerance, scikit-learn's gradient test, however many steps it takes (docs/performance.md §6
gives the re-scored runs).

The objective is scikit-learn's (>= 1.1, checked against 1.9): for each problem
``C * sum_i CE_i + 0.5 * ||W||^2`` with an unpenalised intercept, minimised in sklearn's scaling
``mean_i CE_i + ||W||^2 / (2 C n)`` so that ``tol`` bounds the same gradient. Two classes use the
binomial form (one class's weights fixed at 0), as scikit-learn does.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

STANDARDISED_CS = (0.01, 0.1, 1.0, 10.0)
N_SPLITS = 3
# max |gradient| in W of the scaled objective: scikit-learn's own test (LogisticRegression's tol), here
# without its max_iter=300 cap, which stopped it short of this on real embeddings
TOL = 1e-4
MAX_ITER = 500
# the features' products' precision: on long-preset problems float32 stays as close to a float64 solve at a
# tenth of the tolerance as float64 itself does (benchmarks/probe_tol_rotate_long_metavae.json), in about half the time
PRECISION = torch.float32
MEMORY = 2 ** 29  # bytes of float64 features and logits held at once; problems beyond it go in further chunks


def sklearn_standardised_probe(train_x, train_y, test_x, test_y, cs: Sequence = STANDARDISED_CS,
                               max_iter: int = 300, tol: float = 1e-4) -> tuple:
    """(chosen C, test accuracy) by scikit-learn, the definition the batched solve reproduces; the
    defaults are the old probe's (which may stop short of the optimum), a large ``max_iter`` and
    small ``tol`` give the converged answer."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    def fit(x, y, c):
        return LogisticRegression(C=c, max_iter=max_iter, tol=tol).fit(x, y)

    scaler = StandardScaler().fit(train_x)
    xs = scaler.transform(train_x)
    folds = list(StratifiedKFold(n_splits=N_SPLITS).split(xs, train_y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        scores = [np.mean([fit(xs[a], train_y[a], c).score(xs[b], train_y[b]) for a, b in folds]) for c in cs]
        best = cs[int(np.argmax(scores))]
        clf = fit(xs, train_y, best)
    return float(best), float(clf.score(scaler.transform(test_x), test_y))


def batched_lbfgs(fg, w: torch.Tensor, tol: float = TOL, max_iter: int = MAX_ITER, memory: int = 10) -> torch.Tensor:
    """Minimise B independent smooth functions at once: ``fg(w, rows) -> (f, grad, stationarity)``
    evaluates the problems ``rows`` (a LongTensor) at ``w`` (len(rows), P). Each problem keeps its
    own curvature pairs, Armijo backtracking step and stopping test (stationarity, e.g. max |grad|,
    <= tol, or no decrease), and only unconverged problems are evaluated, so the batch costs what
    solving them one by one would, in far fewer, larger tensor operations."""
    f, g, stat = fg(w, torch.arange(len(w)))
    S, Y, rho = [], [], []  # curvature pairs (B, P); rho 0 marks a pair a problem rejected
    gamma = torch.ones_like(f)
    active = stat > tol
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        d = -_two_loop(g, S, Y, rho, gamma)
        gd = (g * d).sum(1)
        bad = gd >= 0  # not a descent direction: steepest descent instead
        d[bad], gd[bad] = -g[bad], -(g[bad] ** 2).sum(1)
        t = torch.ones_like(f) if S else 1.0 / g.norm(dim=1).clamp(min=1.0)  # scipy's first step: a unit-norm move
        w_new, f_new, g_new, stat, ok = _backtrack(fg, w, f, g, stat, d, gd, t, active)
        s, y = w_new - w, g_new - g
        sy, yy = (s * y).sum(1), (y * y).sum(1)
        valid = ok & (sy > 1e-10 * yy)
        S.append(torch.where(valid[:, None], s, 0.0))
        Y.append(torch.where(valid[:, None], y, 0.0))
        rho.append(torch.where(valid, 1.0 / torch.where(valid, sy, 1.0), 0.0))
        gamma = torch.where(valid, sy / torch.where(valid, yy, 1.0), gamma)
        if len(S) > memory:
            S.pop(0), Y.pop(0), rho.pop(0)
        flat = (f - f_new).abs() <= 64 * torch.finfo(f.dtype).eps * torch.maximum(f.abs(), f_new.abs()).clamp(min=1.0)
        w, f, g = w_new, f_new, g_new
        active = active & ok & ~flat & (stat > tol)
    return w


def _two_loop(g, S, Y, rho, gamma) -> torch.Tensor:
    """L-BFGS's inverse-Hessian product H g, row by row (rows with rho 0 skip that pair)."""
    q, alphas = g.clone(), []
    for s, y, r in zip(reversed(S), reversed(Y), reversed(rho)):
        a = r * (s * q).sum(1)
        q -= a[:, None] * y
        alphas.append(a)
    q *= gamma[:, None]
    for s, y, r, a in zip(S, Y, rho, reversed(alphas)):
        b = r * (y * q).sum(1)
        q += s * (a - b)[:, None]
    return q


def _backtrack(fg, w, f, g, stat, d, gd, t, active, c1: float = 1e-4, tries: int = 40):
    """Per-problem Armijo backtracking from step ``t``, evaluating only the problems still
    searching; a problem that finds no decrease keeps its point (``ok`` False)."""
    w_new, f_new, g_new, stat = w.clone(), f.clone(), g.clone(), stat.clone()
    searching, ok = active.clone(), torch.zeros_like(active)
    for _ in range(tries):
        rows = searching.nonzero().squeeze(1)
        if len(rows) == 0:
            break
        w_try = w[rows] + t[rows, None] * d[rows]
        f_try, g_try, stat_try = fg(w_try, rows)
        accept = torch.isfinite(f_try) & (f_try <= f[rows] + c1 * t[rows] * gd[rows])
        hit = rows[accept]
        w_new[hit], f_new[hit], g_new[hit], stat[hit] = w_try[accept], f_try[accept], g_try[accept], stat_try[accept]
        ok[hit], searching[hit] = True, False
        t = torch.where(searching, 0.5 * t, t)
    return w_new, f_new, g_new, stat, ok


def standardised_probes(problems: Sequence, cs: Sequence = STANDARDISED_CS, tol: float = TOL,
                        max_iter: int = MAX_ITER, precision: torch.dtype = PRECISION) -> list:
    """(chosen C, test accuracy) of the standardised probe for each problem ``(train_x, train_y,
    test_x, test_y)``, all solved together (chunked to bound memory). Same rule as
    `sklearn_standardised_probe`: features standardised on the whole train set, C from ``cs`` (in
    increasing order) by the mean accuracy over StratifiedKFold(3) folds of it, the smaller C on ties."""
    cs = tuple(sorted(float(c) for c in cs))
    prepared = [_prepare(*p) for p in problems]
    classes = np.unique(np.concatenate([p["train_y"] for p in prepared]))
    out = [None] * len(prepared)
    for chunk in _chunks(prepared, len(classes)):
        for i, result in zip(chunk, _solve_chunk([prepared[i] for i in chunk], classes, cs, tol, max_iter, precision)):
            out[i] = result
    return out


def _prepare(train_x, train_y, test_x, test_y) -> dict:
    """Standardised features and the stratified folds of one problem (sklearn's own scaler and
    splitter, so that both probes see the very same numbers and rows)."""
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    train_x, test_x = np.asarray(train_x, dtype=np.float64), np.asarray(test_x, dtype=np.float64)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if len(np.unique(train_y)) < 2:
        raise ValueError("a probe needs at least two classes among its train labels")
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"probe features must be (n, d) arrays of one d, got {train_x.shape} and {test_x.shape}")
    scaler = StandardScaler().fit(train_x)
    xs = scaler.transform(train_x)
    folds = list(StratifiedKFold(n_splits=N_SPLITS).split(xs, train_y))
    return {"train_x": xs, "train_y": train_y, "test_x": scaler.transform(test_x), "test_y": test_y, "folds": folds}


def _chunks(prepared: list, k: int) -> list:
    """Index groups of problems of one feature dimension whose stacked tensors fit in `MEMORY`."""
    groups: dict = {}
    for i, p in enumerate(prepared):
        groups.setdefault(p["train_x"].shape[1], []).append(i)
    chunks = []
    for d, idx in groups.items():
        n = max(max(len(prepared[i]["train_y"]), len(prepared[i]["test_y"])) for i in idx)
        # float64 features of the folds, their held-out rows, the whole set and the test set, with room to
        # spare, plus the softmax work
        per_problem = 8 * n * ((d + 1) * (N_SPLITS + 4) + 6 * k)
        size = max(1, MEMORY // per_problem)
        chunks += [idx[s:s + size] for s in range(0, len(idx), size)]
    return chunks


def _stack(arrays: list, n: int, intercept: bool) -> torch.Tensor:
    """Arrays padded with zeros to ``n`` rows and stacked; features (``intercept``) get a float64
    column of ones on their real rows."""
    if not intercept:  # labels
        out = torch.zeros(len(arrays), n, dtype=torch.long)
        for i, a in enumerate(arrays):
            out[i, :len(a)] = torch.as_tensor(a)
        return out
    out = torch.zeros(len(arrays), n, arrays[0].shape[1] + 1, dtype=torch.float64)
    for i, a in enumerate(arrays):
        out[i, :len(a), :-1] = torch.as_tensor(a, dtype=torch.float64)
        out[i, :len(a), -1] = 1.0
    return out


class _Multinomial:
    """B L2-penalised multinomial logistic regressions on stacked, zero-padded features
    (B, N, D+1; last column the unpenalised intercept) and labels (B, N), over the classes present
    in each problem (the others' logits pushed to -1e30; with two present, the first's weights stay
    0: sklearn's binomial form).

    Embeddings' features are correlated, which makes plain L-BFGS take thousands of steps at C=10
    (scikit-learn stops at max_iter=300, short of the optimum). So each problem is solved in
    preconditioned variables V, W = M V with M = (A / 4 + E / (C n))^(-1/2), A the features' second
    moment and E the penalised coordinates: the same optimum, reached in far fewer steps. The
    features stay as they are (W = M V is formed per evaluation, a (D+1)^2 K product, instead of
    transforming N x (D+1) features for every C: most of the time at D = 784, the pixels)."""

    def __init__(self, arrays: list, labels: list, C, k: int, precision: torch.dtype = PRECISION):
        n = max(len(a) for a in arrays)
        # features transposed (B, D+1, N): both products of an evaluation run fastest on this layout
        xt = _stack(arrays, n, True).transpose(1, 2).contiguous()
        self.y = _stack(labels, n, False)
        real = (torch.arange(n)[None] < torch.tensor([len(a) for a in arrays])[:, None]).to(torch.float64)
        self.n = real.sum(1)
        self.weight = real / self.n[:, None]  # each example's weight in the mean CE (0: padding)
        self.moment = torch.bmm(xt, xt.transpose(1, 2)) / self.n[:, None, None]
        self.xt = xt.to(precision)  # the N-long products' operands
        self.weight_x = self.weight.to(precision)
        present = torch.zeros(len(arrays), k, dtype=torch.bool)
        for i, lab in enumerate(labels):
            present[i, torch.as_tensor(np.unique(lab))] = True
        first = torch.zeros_like(present).scatter(1, present.to(torch.long).argmax(1, keepdim=True), True)
        self.free = present & ~(first & (present.sum(1, keepdim=True) == 2))
        self.absent = torch.where(present, 0.0, -1e30).to(torch.float64)
        self.absent_x = self.absent.to(precision)
        self.penalised = torch.ones(self.xt.shape[1], 1, dtype=torch.float64)
        self.penalised[-1] = 0.0  # the intercept
        self.k = k
        self.set_C(C)

    def set_C(self, C) -> None:
        """Penalties (B,) and the preconditioner M they imply."""
        B, D1 = len(self.xt), self.xt.shape[1]
        self.C = torch.as_tensor(C, dtype=torch.float64).expand(B).clone()
        self.lam = 1.0 / (self.C * self.n)
        evals, evecs = torch.linalg.eigh(self.moment / 4 + torch.diag_embed(self.lam[:, None] * self.penalised[:, 0]) +
                                         1e-12 * torch.eye(D1, dtype=torch.float64))
        evals = evals.clamp(min=1e-12)
        self.M = evecs @ torch.diag_embed(evals ** -0.5) @ evecs.transpose(1, 2)
        self.M_inv = evecs @ torch.diag_embed(evals ** 0.5) @ evecs.transpose(1, 2)

    def to_v(self, w: torch.Tensor) -> torch.Tensor:
        return torch.bmm(self.M_inv, w.view(len(w), -1, self.k)).reshape(len(w), -1)

    def to_w(self, v: torch.Tensor) -> torch.Tensor:
        return torch.bmm(self.M, v.view(len(v), -1, self.k)).reshape(len(v), -1)

    def logits(self, w: torch.Tensor, x: torch.Tensor, absent: torch.Tensor) -> torch.Tensor:
        """(B, N, K) logits of features ``x`` under flat weights ``w`` (B, (D+1) K)."""
        return torch.bmm(x, w.view(len(w), x.shape[2], self.k)).add_(absent[:, None])

    def fg(self, v: torch.Tensor, rows: torch.Tensor) -> tuple:
        """sklearn's scaled objective mean CE + ||W||^2 / (2 C n), its gradient in V, and the max
        |gradient| in W (the stopping test sklearn applies) for problems ``rows``, one problem at a
        time on views of the stacked features: the line search evaluates ever-changing subsets of
        problems, which a batched product would first have to copy out."""
        out = [self._fg_one(int(b), vb) for b, vb in zip(rows, v)]
        return tuple(torch.stack(t) for t in zip(*out))

    def _fg_one(self, b: int, v: torch.Tensor) -> tuple:
        """`fg` of problem ``b``, classes first ((K, N) logits): the softmax reduces over the
        short class dim with the long example dim contiguous, several times faster than (N, K)."""
        W = torch.mm(self.M[b], v.view(-1, self.k))  # (D+1, K), float64
        xt = self.xt[b]
        z = torch.mm(W.t().to(xt.dtype), xt).add_(self.absent_x[b][:, None])  # (K, N), features' precision
        m = z.amax(0)
        p = torch.exp(z - m)
        s = p.sum(0)
        p.div_(s)
        y = self.y[b][None]
        ce = m + s.log_() - z.gather(0, y)[0]
        weight = self.weight[b]
        PW = W * self.penalised
        f = torch.dot(ce.to(weight.dtype), weight) + 0.5 * self.lam[b] * torch.dot(PW.reshape(-1), W.reshape(-1))
        p.scatter_add_(0, y, torch.full(y.shape, -1.0, dtype=p.dtype)).mul_(self.weight_x[b])
        G = (torch.mm(xt, p.t()).to(weight.dtype) + self.lam[b] * PW) * self.free[b]  # gradient in W (D+1, K)
        return f, torch.mm(self.M[b], G).reshape(-1), G.abs().amax()

    def accuracy(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, counts: Sequence) -> list:
        """Each problem's accuracy on its first ``counts[b]`` rows of raw features ``x`` under weights
        ``w`` (labels -1 never hit), computed as sklearn's score is (mean of a boolean array)."""
        pred = self.logits(w, x, self.absent).argmax(-1).numpy()
        y = y.numpy()
        return [float(np.mean(pred[b, :c] == y[b, :c])) for b, c in enumerate(counts)]

    def stack_eval(self, arrays: list, labels: list) -> tuple:
        """Features and labels of evaluation rows, padded like the training ones."""
        m = max(len(a) for a in arrays)
        return _stack(arrays, m, True), _stack(labels, m, False)


def _solve_chunk(problems: list, classes: np.ndarray, cs: tuple, tol: float, max_iter: int,
                 precision: torch.dtype = PRECISION) -> list:
    """Cross-validate C for every problem of the chunk (every fold a problem of the batch,
    warm-started along C), then refit each on its whole train set at its chosen C and score it."""
    V, K, d = len(problems), len(classes), problems[0]["train_x"].shape[1]
    code = [np.searchsorted(classes, p["train_y"]) for p in problems]
    fit = [(p["train_x"][a], c[a], p["train_x"][b], c[b]) for p, c in zip(problems, code) for a, b in p["folds"]]
    folds = _Multinomial([f[0] for f in fit], [f[1] for f in fit], cs[0], K, precision)
    held_x, held_y = folds.stack_eval([f[2] for f in fit], [f[3] for f in fit])
    w, solutions, scores = torch.zeros(len(fit), (d + 1) * K, dtype=torch.float64), [], []
    for c in cs:
        folds.set_C(c)
        w = folds.to_w(batched_lbfgs(folds.fg, folds.to_v(w), tol, max_iter))
        solutions.append(w.view(V, N_SPLITS, -1))
        acc = folds.accuracy(w, held_x, held_y, [len(f[3]) for f in fit])
        scores.append([np.mean(acc[v * N_SPLITS:(v + 1) * N_SPLITS]) for v in range(V)])
    del folds, held_x, held_y
    best = [int(np.argmax([scores[i][v] for i in range(len(cs))])) for v in range(V)]
    whole = _Multinomial([p["train_x"] for p in problems], code, [cs[b] for b in best], K, precision)
    w0 = torch.stack([solutions[b][v].mean(0) for v, b in enumerate(best)])
    w = whole.to_w(batched_lbfgs(whole.fg, whole.to_v(w0), tol, max_iter))
    test_code = []
    for p in problems:  # test labels never seen in training can never be predicted
        idx = np.searchsorted(classes, p["test_y"]).clip(max=K - 1)
        test_code.append(np.where(classes[idx] == p["test_y"], idx, -1))
    test_x, test_y = whole.stack_eval([p["test_x"] for p in problems], test_code)
    acc = whole.accuracy(w, test_x, test_y, [len(p["test_y"]) for p in problems])
    return [(cs[b], a) for b, a in zip(best, acc)]
