"""bf16 mixed precision (``TrainConfig(amp="bf16")``) on the CPU and on CUDA, with float32 where it matters.

Under `torch.autocast` the matrix products and convolutions run in bfloat16 and every other op in
the dtype of its inputs, so without care a model's latent parameters, its likelihood parameters and
everything computed from them (KL terms, Gaussian log-densities, the loss's reduction) would be
bfloat16 too: 8 bits of mantissa, so a mixture mean of 5 is rounded to a multiple of 1/32, and a
compiled-inference loss is summed in bfloat16. The policy here (`bf16_autocast`):

* the matmuls and convolutions of the networks run in bfloat16 (autocast), parameters, gradients
  and Adam's state stay float32;
* every module that outputs the parameters of a distribution (`PARAMETER_MODULES`: a MetaVAE's
  ``head`` and ``decoder``, the hierarchical models' ``statistic``, ``inference``, ``latent_prior``
  and ``obs_decoder``) returns float32, so log-likelihoods, KLs and the reductions to the loss are
  float32 (forward hooks, present only inside `fp32_parameter_outputs`);
* the *final layer* of a decoder bank (`nets.mlp.BatchedMLP`, `nets.conv.ConvDecoderTrunk`) runs in
  float32 (`nets.mlp.fp32_output_layer`), so likelihood parameters are not rounded to bf16 before the cast;
  an MLP bank's last layer still takes its two gradient products in bfloat16, as every other layer
  does under autocast (`nets.mlp._Fp32OutBaddbmm`).

Validation runs without autocast (float32), so validation losses compare across ``amp`` settings.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PARAMETER_MODULES = ("head", "decoder", "statistic", "inference", "latent_prior", "obs_decoder")


def _to_float32(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() and out.dtype != torch.float32 else out
    if isinstance(out, tuple):  # e.g. the expfam decoder's FamilyParams (a NamedTuple)
        items = [_to_float32(o) for o in out]
        return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
    return out


def _cast_hook(module, inputs, output):
    return _to_float32(output)


@functools.lru_cache(maxsize=None)
def cpu_bf16_support() -> dict:
    """What this CPU offers for bfloat16 matmuls: torch's dispatch level, the /proc/cpuinfo flags
    (avx512_bf16: Zen 4 / Cooper Lake and later; amx_bf16: Sapphire Rapids and later) and whether
    oneDNN reports native bf16. Without native support bf16 still works, emulated and slower."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    native = bool({"avx512_bf16", "amx_bf16"} & flags) or onednn
    return {"capability": torch.backends.cpu.get_cpu_capability(), "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags, "onednn_bf16": onednn, "native": native}


def check_bf16(device: torch.device) -> None:
    """A one-line warning where bf16 would be emulated (it works, but slower than float32)."""
    if device.type == "cpu":
        info = cpu_bf16_support()
        if not info["native"]:
            logger.warning("amp='bf16' on a CPU without native bfloat16 matmuls (no avx512_bf16 or amx_bf16; "
                           "torch dispatch level %s): it works, but is likely slower than float32",
                           info["capability"])
    elif device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"amp='bf16' needs a GPU with bfloat16 support; {torch.cuda.get_device_name(device)} has none")


@contextlib.contextmanager
def fp32_parameter_outputs(model: torch.nn.Module):
    """Within this block the `PARAMETER_MODULES` of ``model`` return float32 (forward hooks, removed
    on exit; a float32 output passes through untouched, so outside autocast they change nothing)."""
    handles = []
    for name in PARAMETER_MODULES:
        mod = getattr(model, name, None)
        if isinstance(mod, torch.nn.Module):
            handles.append(mod.register_forward_hook(_cast_hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def bf16_autocast(model: torch.nn.Module, device_type: str):
    """Autocast to bfloat16 with the float32 policy of this module's docstring (what
    ``TrainConfig(amp="bf16")`` runs each training step under)."""
    with fp32_parameter_outputs(model), torch.autocast(device_type=device_type, dtype=torch.bfloat16):
        yield
