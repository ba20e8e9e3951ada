"""Per-feature preprocessing fitted on a training family and kept in the model file.

Why: models train well on roughly unit-scale inputs, and a user's table in grams or millimetres is
not. `metavae train` fits a `Scaler` on the training points and saves it (plain lists) beside the
weights, so `embed`, `adapt`, `log_prob` and `evaluate` apply the same map and `sample` inverts it.

uint8 arrays are read as intensities x / 255 before anything else (the library's one convention, as
`MetaDataset` does), so a uint8 family and the same family as float / 255 give identical results.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

SCALES = ("auto", "standard", "unit", "none")
LIKELIHOODS = ("auto", "gaussian", "bernoulli")


def as_float(x) -> torch.Tensor:
    """Points as a float32 tensor in data units (uint8 intensities divided by 255)."""
    if not isinstance(x, torch.Tensor):
        x = np.asarray(x)
        x = x if x.flags.writeable else np.array(x)  # a read-only memmap is copied (torch wants writable arrays)
    t = torch.as_tensor(x)
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    return t.float()


def in_unit_range(points) -> bool:
    """Whether every value lies in [0, 1] (uint8 counts: it is read as x / 255)."""
    for p in points:
        if np.asarray(p[:0]).dtype == np.uint8:
            continue
        a = np.asarray(p)
        if a.size and (float(a.min()) < 0.0 or float(a.max()) > 1.0):
            return False
    return True


@dataclass
class Scaler:
    """x_model = (as_float(x) - offset) / scale, per feature (offset and scale have the event shape)."""

    kind: str
    offset: torch.Tensor
    scale: torch.Tensor

    def to_model(self, x) -> torch.Tensor:
        t = as_float(x)
        return (t - self.offset.to(t.device)) / self.scale.to(t.device)

    def to_data(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.device) + self.offset.to(x.device)

    @property
    def log_det(self) -> float:
        """sum log scale: log p_data(x) = log p_model(x_model) - log_det (the Jacobian of the map)."""
        return float(torch.log(self.scale.double()).sum())

    def state(self) -> dict:
        """Plain values for the model file (loadable with ``weights_only=True``)."""
        return {"kind": self.kind, "shape": list(self.offset.shape), "offset": self.offset.flatten().tolist(),
                "scale": self.scale.flatten().tolist()}

    @classmethod
    def from_state(cls, state: dict | None, event_shape) -> "Scaler":
        """The saved scaler, or the identity for model files written before scalers existed."""
        if not state:
            return identity(event_shape)
        shape = tuple(state.get("shape", event_shape))
        return cls(state["kind"], torch.tensor(state["offset"], dtype=torch.float32).reshape(shape),
                   torch.tensor(state["scale"], dtype=torch.float32).reshape(shape))

    @classmethod
    def of(cls, model) -> "Scaler":
        return cls.from_state(getattr(model, "extra", {}).get("preprocess"), model.event_shape)


def identity(event_shape) -> Scaler:
    return Scaler("none", torch.zeros(tuple(event_shape)), torch.ones(tuple(event_shape)))


def choose_scale(points) -> str:
    """``unit`` for uint8 or [0, 1] intensities, ``standard`` for other real values."""
    return "unit" if in_unit_range(points) else "standard"


def fit_scaler(points, kind: str = "auto") -> Scaler:
    """Fit on the training points (a list of arrays, one per distribution, pooled). ``standard``:
    per-feature mean and standard deviation (a constant feature keeps scale 1); ``unit``: one range
    for every feature (so images keep their relative intensities) onto [0, 1]; ``none``: identity."""
    if kind not in SCALES:
        raise ValueError(f"unknown scale {kind!r}; choose from {', '.join(SCALES)}")
    event = tuple(points[0].shape[1:])
    kind = choose_scale(points) if kind == "auto" else kind
    if kind == "none":
        return identity(event)
    flat = [as_float(p).double() for p in points]
    if kind == "unit":
        lo = min(float(f.min()) for f in flat)
        hi = max(float(f.max()) for f in flat)
        if 0.0 <= lo and hi <= 1.0:
            lo, hi = 0.0, 1.0  # already intensities: leave them as they are
        span = hi - lo if hi > lo else 1.0
        return Scaler("unit", torch.full(event, lo, dtype=torch.float32), torch.full(event, span, dtype=torch.float32))
    n = sum(len(f) for f in flat)
    mean = sum(f.sum(0) for f in flat) / n
    var = sum(((f - mean) ** 2).sum(0) for f in flat) / max(n - 1, 1)
    std = var.sqrt()
    std = torch.where(std > 1e-8 * max(1.0, float(std.max())), std, torch.ones_like(std))
    return Scaler("standard", mean.float(), std.float())


def choose_likelihood(name: str, scaled_points, quiet: bool = False) -> str:
    """``auto``: Bernoulli when the (scaled) data lie in [0, 1], Gaussian otherwise, with a one-line
    notice; Bernoulli on values outside [0, 1] is refused (its log-probabilities would be meaningless)."""
    if name not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name!r}; choose from {', '.join(LIKELIHOODS)}")
    unit = in_unit_range(scaled_points)
    if name == "bernoulli" and not unit:
        raise ValueError("likelihood=bernoulli needs values in [0, 1]; these data (after scaling) are not: use "
                         "likelihood=gaussian or scale=unit")
    if name != "auto":
        return name
    chosen = "bernoulli" if unit else "gaussian"
    if not quiet:
        why = "values in [0, 1]" if unit else "real values outside [0, 1]"
        print(f"metavae: notice: likelihood={chosen} ({why}; --set likelihood=gaussian|bernoulli to choose)",
              file=sys.stderr)
    return chosen


def data_log_prob(model_log_prob: torch.Tensor, scaler: Scaler, likelihood: str) -> torch.Tensor:
    """A model-unit log-density in the data's units: minus the map's log-Jacobian for a Gaussian
    (a density); Bernoulli scores of grey levels are not densities and are returned as they are."""
    return model_log_prob - scaler.log_det if likelihood == "gaussian" else model_log_prob


__all__ = ["Scaler", "fit_scaler", "choose_scale", "choose_likelihood", "as_float", "data_log_prob",
           "in_unit_range", "identity"]
