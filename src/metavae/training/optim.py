"""The optimisers: `make_optimizer` (Adam, fused where available) and `RowAdam`, Adam that updates a
decoder bank one distribution (row) at a time.

With ``TrainConfig(distributions_per_step=S)`` each step trains S of the K training distributions.
A bank parameter (K, ...) then holds the decoders of all K, but only the S selected rows get a
gradient (a sparse one, see `metavae.nets.mlp.sparse_bank_gradients`). Plain Adam would still move
every other row through its momentum (and decay their second moments), so a decoder would change in
steps that never saw its data. `RowAdam` keeps Adam's state per row, with a step count per row for
the bias corrections: a row is updated exactly as Adam would update that decoder alone, over the
steps in which its distribution was drawn, and an unselected row's weights and state are untouched.
Its cost is that of the selected rows (index_select / index_copy), independent of K. Under DDP or
torch.compile the gradients are dense (zero outside the step's rows) and the trainer names the rows in
``rows``. Every other parameter (the shared encoder) takes torch's own Adam step (`make_optimizer`:
fused where available).
"""
from __future__ import annotations

import torch


def make_optimizer(params, lr: float, **adam) -> torch.optim.Optimizer:
    """Adam with PyTorch's default betas/eps (the paper's optimiser; ``adam`` overrides them). The
    fused kernel updates each parameter in one pass instead of about ten elementwise passes; for the
    6.2M-parameter MLP MetaVAE on a CPU the unfused update was a large share of a training step."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True, **adam)
    except (RuntimeError, TypeError):  # a device or dtype without a fused kernel
        return torch.optim.Adam(params, lr=lr, **adam)


class RowAdam(torch.optim.Optimizer):
    """Adam (PyTorch's default betas and eps, no weight decay) with row-wise state for ``bank_params``."""

    def __init__(self, params, bank_params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        params = list(params)
        bank = {id(p) for p in bank_params}
        dense = [p for p in params if id(p) not in bank]
        rows = [p for p in params if id(p) in bank]
        groups = []
        if dense:
            groups.append({"params": dense, "rows": False})
        if rows:
            groups.append({"params": rows, "rows": True})
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), eps=eps))
        # The shared parameters take torch's own Adam (fused where it can), holding its per-parameter
        # state in this optimizer's: one state_dict, the layout and numbers of a plain Adam.
        self._dense = None
        self.rows = None  # the step's distributions (bank rows), for dense row gradients (DDP, compile)
        if dense:
            self._dense = make_optimizer(dense, lr, betas=tuple(betas), eps=eps)
            # a fused Adam keeps its step counts on the parameters' device; loading must too
            self.param_groups[0]["fused"] = bool(self._dense.defaults.get("fused"))
            self._dense.state = self.state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)  # replaces self.state: link the dense Adam to the new one
        if self._dense is not None:
            self._dense.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["rows"]:
                b1, b2 = group["betas"]
                for p in group["params"]:
                    if p.grad is not None:
                        self._row_step(p, group["lr"], b1, b2, group["eps"])
            else:
                if any(p.grad is not None and p.grad.is_sparse for p in group["params"]):
                    raise RuntimeError("RowAdam: a parameter outside the decoder banks got a sparse gradient")
                self._dense.param_groups[0].update(lr=group["lr"], betas=group["betas"], eps=group["eps"])
                self._dense.step()
        return loss

    def _row_step(self, p, lr, b1, b2, eps):
        st = self.state[p]
        if not st:
            st["row_step"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        grad = p.grad
        shape = (-1,) + (1,) * (p.dim() - 1)
        rows = None
        if grad.is_sparse:
            grad = grad.coalesce()
            rows, g = grad.indices()[0], grad.values()
        elif self.rows is not None and len(self.rows) < p.shape[0]:  # dense, zero outside the step's rows (DDP)
            rows = self.rows.to(p.device)
            g = grad.index_select(0, rows)
        if rows is not None:
            t = st["row_step"].index_select(0, rows).add_(1)
            st["row_step"].index_copy_(0, rows, t)
            m = st["exp_avg"].index_select(0, rows).lerp_(g, 1 - b1)
            v = st["exp_avg_sq"].index_select(0, rows).mul_(b2).addcmul_(g, g, value=1 - b2)
            st["exp_avg"].index_copy_(0, rows, m)
            st["exp_avg_sq"].index_copy_(0, rows, v)
            target = p.index_select(0, rows)
        else:  # every row has a gradient (all K distributions in the step)
            rows, g = None, grad
            t = st["row_step"].add_(1)
            m = st["exp_avg"].lerp_(g, 1 - b1)
            v = st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            target = p
        step_size = (lr / (1 - torch.pow(b1, t))).view(shape)
        denom = (v.sqrt() / (1 - torch.pow(b2, t)).sqrt().view(shape)).add_(eps)
        target.sub_(step_size * m / denom)
        if rows is not None:
            p.index_copy_(0, rows, target)


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_`, also for gradients of which some are sparse (row gradients
    of a decoder bank): the 2-norm over every gradient's stored values, each scaled by
    min(1, max_norm / (norm + 1e-6)). All-dense gradients take torch's own (foreach) clip."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    if not any(p.grad.is_sparse for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norms = []
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            norms.append(torch.linalg.vector_norm(p.grad.values()))
        else:
            norms.append(torch.linalg.vector_norm(p.grad))
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        (p.grad.values() if p.grad.is_sparse else p.grad).mul_(coef)
    return total


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params,
                   grad_clip: float | None = None) -> None:
    """One update of the training loop: the gradients of ``loss``, clipped to norm ``grad_clip`` when
    set, then the optimizer's step. The `Trainer` and decoder adaptation (`models.decoder_bank`) both
    step through here, so they cannot drift apart."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:  # with distributions_per_step the bank rows' gradients are sparse
        clip_grad_norm(params, grad_clip)
    optimizer.step()
