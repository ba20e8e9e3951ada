"""Training-step benchmarks against the machine's own matmul peaks (fp32 and bf16).

    python benchmarks/bench.py [--device cpu|cuda] [--quick] [--only SECTION,...] [--steps N]

Sections (all by default; ``--only`` picks some, the others keep their stored results):
  mlp       the MLP MetaVAE on transformed-MNIST-sized data (K=9, B=100, N=10), plain and with context
            pools of 100 and 50, each in fp32 and bf16 (``TrainConfig(amp="bf16")``'s policy), the two
            precisions timed *interleaved* step by step in one process so that a shared machine's drift
            hits both alike;
  conv      the full-width convolutional MetaVAE (32x32, K=3, B=32, N=10): fp32, bf16, both with
            channels-last activations, and both with a context pool of 64 (the NORB presets), interleaved;
  epoch     one real 600-step epoch of the paper preset (60,000 images / B=100) for fp32 and bf16,
            interleaved in blocks of 25 steps, in raw seconds (``--epoch-pool 50``: with the long
            preset's context pool);
  ksweep    step time and peak memory at K = 10, 100, 1000 small MLP decoders, all K per step or
            ``distributions_per_step=10`` (figure ``k_sweep_<device>.png``), one process per point;
  mapped    a family several GB on disk (uint8 .npy, one per distribution, under /tmp), trained from
            the in-memory padded storage and from ``storage="mapped"``: resident memory and step time,
            one process each; the files are deleted afterwards;
  limited   a family several times larger than the memory its trainer may use (``--limited-family-gb``
            on disk, each worker in a memory cgroup of ``--memory-limit-gb``, page cache included):
            mapped storage against padded, cold page cache; needs root for the cgroup;
  sweep     the MLP step time over K, B and N around (9, 100, 10) (figure ``step_time_sweep_<device>.png``);
  reference the authors' step pattern (`reference_step.py`), on the CPU only.

Every row has the FLOPs per step counted by torch's FlopCounterMode (forward and backward
matmuls/convs, whatever their dtype), the achieved FLOP/s, and the dense fp32 and bf16 ``torch.mm``
FLOP/s measured just before and after it: ``fraction_of_peak`` is achieved / the peak of the row's
own precision (fp32 rows: the fp32 peak; bf16 rows: the bf16 peak), ``fraction_of_fp32_peak`` beside
it. Results are merged into `benchmarks/results.json` under the device's name.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from metavae import MetaDataset, build_mlp_metavae
from metavae.io import atomic_write_text
from metavae.training import make_optimizer, resolve_device
from metavae.training.precision import bf16_autocast, cpu_bf16_support

HERE = Path(__file__).resolve().parent
PAPER_TRAIN_IMAGES = 60_000
ISSUE_REFERENCE_EPOCH_S = 350.0  # the authors' epoch as measured in issue #7 (another machine) ...
ISSUE_PEAK_GFLOPS = 350.0  # ... whose fp32 torch.mm peak was about this
SECTIONS = ("mlp", "conv", "epoch", "ksweep", "mapped", "limited", "sweep", "reference")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype=torch.float32, n=2048, reps=10) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peaks(device) -> dict:
    return {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}


def rss() -> dict:
    """Peak and current resident memory (MB): ``peak_rss_mb`` is this process's VmHWM from
    /proc/self/status (getrusage's ru_maxrss would carry over the parent's peak into a benchmark
    worker started by fork + exec), beside VmRSS, RssAnon (the process's own memory) and RssFile
    (mapped files: shared libraries, memory-mapped data)."""
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
        out["peak_rss_mb"] = out.get("VmHWM", out["peak_rss_mb"])
    except OSError:
        pass
    return out


def make_data(K, event, n, device, storage="padded"):
    g = torch.Generator().manual_seed(0)
    dists = [torch.randint(0, 256, (n, *event), generator=g, dtype=torch.uint8) for _ in range(K)]
    return MetaDataset(dists, val_fraction=0, test_fraction=0).to(device)


def conv_model(K):
    from metavae.models import make_model

    return make_model("metavae", arch="conv", event_shape=(1, 32, 32), n_distributions=K)


class Stepper:
    """One configuration's full training step (sampling, forward, backward, Adam), as the Trainer runs it.
    ``loss_fn`` (default ``model.loss``): what computes the loss dict from a batch, e.g. a compiled one.
    A call returns the step's loss (detached)."""

    def __init__(self, model, data, B, N, device, pool=None, amp=None, channels_last=False, lr=2e-4, loss_fn=None):
        self.model, self.data, self.B, self.N, self.device = model, data, B, N, device
        self.pool, self.amp, self.channels_last = pool, amp, channels_last
        self.loss_fn = model.loss if loss_fn is None else loss_fn
        self.opt = make_optimizer(model.parameters(), lr)
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.times: list[float] = []
        model.train()

    def __call__(self):
        batch = self.data.sample(self.B, self.N, generator=self.gen, context_pool=self.pool)
        with _channels_last(self.channels_last):
            if self.amp == "bf16":
                with bf16_autocast(self.model, self.device.type):
                    loss = self.loss_fn(batch)["loss"]
            else:
                loss = self.loss_fn(batch)["loss"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def timed(self):
        sync(self.device)
        t = time.perf_counter()
        self()
        sync(self.device)
        self.times.append(time.perf_counter() - t)

    def flops(self) -> int:
        with FlopCounterMode(display=False) as fc:
            self()
        return fc.get_total_flops()


def _channels_last(enabled: bool):
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    from metavae.nets.conv import channels_last

    return channels_last()


def interleaved(steppers: dict, steps: int, device, warmup: int = 2) -> dict:
    """Time each configuration ``steps`` times, one step of each in turn, between two peak measurements."""
    for s in steppers.values():
        for _ in range(warmup):
            s()
    flops = {name: s.flops() for name, s in steppers.items()}
    before = peaks(device)
    for _ in range(steps):
        for s in steppers.values():
            s.timed()
    after = peaks(device)
    rows = {}
    for name, s in steppers.items():
        med, mean = statistics.median(s.times), statistics.mean(s.times)
        achieved = flops[name] / med
        pk = {k: (before[k] + after[k]) / 2 for k in before}
        own = "bf16" if s.amp == "bf16" else "fp32"
        K, B, N = len(s.data), s.B, s.N
        rows[name] = {
            "K": K, "B": B, "N": N, "context_pool": s.pool, "amp": s.amp, "channels_last": s.channels_last,
            "step_ms": round(med * 1e3, 2), "step_ms_mean": round(mean * 1e3, 2), "steps_timed": len(s.times),
            "steps_per_s": round(1 / med, 3),
            "query_images_per_s": round(K * B / med, 1),
            "context_images_per_s": round(K * B * N / med, 1),
            "gflop_per_step": round(flops[name] / 1e9, 3),
            "achieved_gflops": round(achieved / 1e9, 2),
            "peak_gflops": round(pk[own] / 1e9, 2),
            "peak_gflops_before_after": [round(before[own] / 1e9, 1), round(after[own] / 1e9, 1)],
            "fraction_of_peak": round(achieved / pk[own], 3),
            "fp32_peak_gflops": round(pk["fp32"] / 1e9, 2),
            "bf16_peak_gflops": round(pk["bf16"] / 1e9, 2),
            "fraction_of_fp32_peak": round(achieved / pk["fp32"], 3),
            "paper_epoch_s": round(mean * -(-PAPER_TRAIN_IMAGES // B), 1),
            "rss_mb": rss()["peak_rss_mb"],
            "parameters": sum(p.numel() for p in s.model.parameters()),
        }
        r = rows[name]
        print(f"{name:28s} {r['step_ms']:9.1f} ms/step  {r['achieved_gflops']:7.1f} GFLOP/s "
              f"({r['fraction_of_peak']:.2f} of the {own} peak {r['peak_gflops']:.0f}, "
              f"{r['fraction_of_fp32_peak']:.2f} of fp32's)  epoch {r['paper_epoch_s']:.0f} s", flush=True)
    return rows


def section_mlp(device, steps) -> dict:
    K, B, N = 9, 100, 10
    data = make_data(K, (784,), 6000, device)
    out = {}
    for suffix, pool in (("", None), ("_pool100", 100), ("_pool50", 50)):
        steppers = {}
        for amp in (None, "bf16"):
            torch.manual_seed(0)
            name = f"metavae_mlp{suffix}" + ("_bf16" if amp else "")
            steppers[name] = Stepper(build_mlp_metavae((784,), K).to(device), data, B, N, device, pool, amp)
        rows = interleaved(steppers, steps, device)
        for name, row in rows.items():
            row["speedup_vs_issue"] = round(ISSUE_REFERENCE_EPOCH_S / row["paper_epoch_s"], 2)
            # had this machine the reference figure's fp32 peak (an estimate: a matmul-bound step scales with it)
            row["speedup_vs_issue_peak_scaled"] = round(
                row["speedup_vs_issue"] * ISSUE_PEAK_GFLOPS / row["fp32_peak_gflops"], 2)
        out.update(rows)
    return out


def section_conv(device, steps, B: int = 32) -> dict:
    data = make_data(3, (1, 32, 32), 2000, device)
    steppers = {}
    for cl in (False, True):
        for amp in (None, "bf16"):
            torch.manual_seed(0)
            name = "metavae_conv" + ("_bf16" if amp else "") + ("_channels_last" if cl else "")
            steppers[name] = Stepper(conv_model(3).to(device), data, B, 10, device, None, amp, cl)
    for amp in (None, "bf16"):  # the NORB presets' step: a context pool of 64 images per distribution
        torch.manual_seed(0)
        steppers["metavae_conv_pool64" + ("_bf16" if amp else "")] = Stepper(conv_model(3).to(device), data, B, 10,
                                                                             device, 64, amp)
    return interleaved(steppers, steps, device, warmup=1)


def section_epoch(device, n_steps: int | None = None, block: int = 25, pool: int | None = None) -> dict:
    """One real epoch of the paper preset (600 steps at B=100; ``n_steps`` fewer) per precision,
    interleaved in blocks of ``block`` steps; ``pool``: the steps' context pool (the long preset's 50)."""
    K, B, N = 9, 100, 10
    data = make_data(K, (784,), 6000, device)
    epoch_steps = -(-PAPER_TRAIN_IMAGES // B)
    n_steps = n_steps or epoch_steps
    steppers = {}
    for amp in (None, "bf16"):
        torch.manual_seed(0)
        steppers[amp or "fp32"] = Stepper(build_mlp_metavae((784,), K).to(device), data, B, N, device, pool, amp)
    for s in steppers.values():
        s()
    before = peaks(device)
    totals = {k: 0.0 for k in steppers}
    done = 0
    while done < n_steps:
        for name, s in steppers.items():
            sync(device)
            t = time.perf_counter()
            for _ in range(min(block, n_steps - done)):
                s()
            sync(device)
            totals[name] += time.perf_counter() - t
        done += min(block, n_steps - done)
    after = peaks(device)
    out = {"steps": n_steps, "K": K, "B": B, "N": N, "context_pool": pool, "threads": torch.get_num_threads(),
           "interleaved_block_steps": block,
           "fp32_peak_gflops_before_after": [round(before["fp32"] / 1e9, 1), round(after["fp32"] / 1e9, 1)],
           "bf16_peak_gflops_before_after": [round(before["bf16"] / 1e9, 1), round(after["bf16"] / 1e9, 1)]}
    for name, total in totals.items():
        out[f"{name}_seconds"] = round(total, 1)
        out[f"{name}_epoch_s"] = round(total * epoch_steps / n_steps, 1)
        print(f"{n_steps} steps (K={K}, B={B}, N={N}) {name}: {total:.1f} s; a {epoch_steps}-step epoch "
              f"{out[f'{name}_epoch_s']:.0f} s", flush=True)
    return out


# --- K sweep: one process per point, so each peak RSS is its own ----------------------------------
KSWEEP_EVENT, KSWEEP_B, KSWEEP_N, KSWEEP_SUBSET, KSWEEP_POINTS = 64, 32, 10, 10, 200


def ksweep_model(K):
    from metavae import Gaussian

    return build_mlp_metavae((KSWEEP_EVENT,), K, z_dim=16, hidden_widths=(128,), summary_widths=(128, 128),
                             decoder_widths=(128, 128), likelihood=Gaussian(1.0))


def worker_ksweep(K: int, subset: int | None, steps: int) -> dict:
    from metavae import TrainConfig, Trainer

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = MetaDataset([torch.randn(KSWEEP_POINTS, KSWEEP_EVENT, generator=g) for _ in range(K)],
                       val_fraction=0, test_fraction=0)
    model = ksweep_model(K)
    cfg = TrainConfig(batch_size=KSWEEP_B, context_size=KSWEEP_N, lr=1e-3, steps_per_epoch=steps + 3,
                      distributions_per_step=subset)
    tr = Trainer(model, data, cfg, progress=False)
    base = rss().get("VmRSS")
    sample_t, model_t = [], []
    it = tr._train_batches()  # the Trainer's own batches and step (fit's loop body)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        t1 = time.perf_counter()
        with tr._autocast():
            loss = tr._step_module(batch)["loss"]
        tr.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        tr.optimizer.step()
        model_t.append(time.perf_counter() - t1)
        sample_t.append(t1 - t0)
    sample_ms = statistics.median(sample_t[3:]) * 1e3
    model_ms = statistics.median(model_t[3:]) * 1e3
    bank = sum(p.numel() for p in model.decoder.parameters())
    m = rss()
    return {"K": K, "distributions_per_step": subset, "step_ms": round(model_ms + sample_ms, 2),
            "model_step_ms": round(model_ms, 2), "sample_ms": round(sample_ms, 2),
            "steps_timed": len(model_t) - 3, "peak_rss_mb": m["peak_rss_mb"], "rss_after_setup_mb": base,
            "decoder_parameters": bank, "parameters": sum(p.numel() for p in model.parameters()),
            "optimizer": type(tr.optimizer).__name__}


def section_ksweep(device, steps) -> dict:
    rows = []
    for K in (10, 100, 1000):
        for subset in (None, min(KSWEEP_SUBSET, K)):
            row = _subprocess(["--worker", "ksweep", "--K", str(K), "--subset", str(subset or 0), "--steps", str(steps)])
            rows.append(row)
            print(f"  K={K:5d} distributions_per_step={str(subset):5s} {row['step_ms']:8.1f} ms/step "
                  f"(sampling {row['sample_ms']:.1f})  peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    plot_ksweep(rows, HERE / f"k_sweep_{device.type}.png")
    return {"event": KSWEEP_EVENT, "B": KSWEEP_B, "N": KSWEEP_N, "points_per_distribution": KSWEEP_POINTS,
            "model": "MLP MetaVAE z=16, encoder/summary 128 wide, decoders 16-128-128-64 (Gaussian)",
            "rows": rows}


def plot_ksweep(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for subset, label in ((None, "all K distributions per step"), (KSWEEP_SUBSET, f"distributions_per_step={KSWEEP_SUBSET}")):
        rs = [r for r in rows if r["distributions_per_step"] == subset]
        if not rs:
            continue
        axes[0].plot([r["K"] for r in rs], [r["step_ms"] for r in rs], "o-", label=label)
        axes[1].plot([r["K"] for r in rs], [r["peak_rss_mb"] for r in rs], "o-", label=label)
    for ax, what in zip(axes, ("ms per training step", "peak resident memory (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("K (training distributions = decoders)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"Step cost vs K: B={KSWEEP_B}, N={KSWEEP_N}, small MLP decoders (CPU, {torch.get_num_threads()} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- a family larger than the in-memory path would like -------------------------------------------
MAPPED_K, MAPPED_ROWS, MAPPED_EVENT = 10, 320_000, 784  # 10 x 320,000 x 784 bytes = 2.51 GB of uint8


def write_family(folder: Path, rows: int = MAPPED_ROWS) -> int:
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    total = 0
    for k in range(MAPPED_K):
        a = np.lib.format.open_memmap(folder / f"d{k:02d}.npy", mode="w+", dtype=np.uint8,
                                      shape=(rows, MAPPED_EVENT))
        for start in range(0, rows, 20_000):
            a[start:start + 20_000] = rng.integers(0, 256, (min(20_000, rows - start), MAPPED_EVENT),
                                                   dtype=np.uint8)
        a.flush()
        total += a.nbytes
        del a
    return total


def evict(folder: Path) -> None:
    """Drop these files' pages from the page cache (only theirs), so every run starts cold."""
    for f in sorted(folder.glob("*.npy")):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def worker_mapped(folder: str, storage: str, steps: int) -> dict:
    """The Trainer's own step loop (so the mapped storage's prefetch thread is part of it)."""
    from metavae import TrainConfig, Trainer
    from metavae.data.files import read_family

    torch.manual_seed(0)
    t = time.perf_counter()
    fam = read_family(folder)
    data = MetaDataset(fam.points, names=fam.names, val_fraction=0.01, test_fraction=0.01, storage=storage)
    build_s = time.perf_counter() - t
    after_build = rss()
    model = build_mlp_metavae((MAPPED_EVENT,), len(data))
    tr = Trainer(model, data, TrainConfig(batch_size=100, context_size=10, steps_per_epoch=steps + 1), progress=False)
    times = []
    t = time.perf_counter()
    for batch in tr._train_batches():  # fit's loop body; a step's time includes waiting for its batch
        with tr._autocast():
            loss = tr._step_module(batch)["loss"]
        tr.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        tr.optimizer.step()
        now = time.perf_counter()
        times.append(now - t)
        t = now
    m = rss()
    return {"storage": storage, "K": len(data), "B": 100, "N": 10, "build_s": round(build_s, 1),
            "rss_after_build_mb": after_build.get("VmRSS"), "step_ms": round(statistics.median(times[1:]) * 1e3, 2),
            "first_steps_ms": [round(x * 1e3, 1) for x in times[:3]], "steps_timed": len(times) - 1,
            "prefetch_thread": storage == "mapped", **m}


def section_mapped(device, steps, folder: Path) -> dict:
    total = write_family(folder)
    print(f"  wrote {total / 1e9:.2f} GB under {folder} ({MAPPED_K} x {MAPPED_ROWS} x {MAPPED_EVENT} uint8)", flush=True)
    try:
        rows = []
        # cold: the files evicted from the page cache first; the padded run reads them whole, so the
        # last mapped run finds them in the page cache (what a family that fits the cache gets)
        for storage, cache in (("mapped", "cold"), ("padded", "cold"), ("mapped", "warm")):
            if cache == "cold":
                evict(folder)
            row = _subprocess(["--worker", "mapped", "--storage", storage, "--dir", str(folder), "--steps", str(steps)])
            row["page_cache"] = cache
            rows.append(row)
            print(f"  storage={storage:7s} ({cache} page cache) build {row['build_s']:6.1f} s  {row['step_ms']:7.1f} ms/step  "
                  f"peak RSS {row['peak_rss_mb']:7.0f} MB (RssAnon {row.get('RssAnon')}, RssFile {row.get('RssFile')})",
                  flush=True)
    finally:
        for f in folder.glob("*.npy"):
            f.unlink()
        folder.rmdir()
    mem = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(("MemTotal", "MemAvailable")):
                mem[line.split(":")[0]] = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return {"family_gb": round(total / 1e9, 2), "files": MAPPED_K, "rows_per_file": MAPPED_ROWS,
            "event": MAPPED_EVENT, "machine_memory_gb": mem, "rows": rows}


CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup/unified")


def memory_cgroup(limit_bytes: int) -> tuple[Path, str, str]:
    """A fresh memory cgroup capped at ``limit_bytes`` (page cache included, as the kernel charges it):
    (folder, the file holding its peak usage, its OOM-kill counter file). cgroup v1 or v2; needs root."""
    for root, limit, peak in ((CGROUP_V1, "memory.limit_in_bytes", "memory.max_usage_in_bytes"),
                              (CGROUP_V2, "memory.max", "memory.peak")):
        if (root / limit).exists() or (root / "cgroup.controllers").exists():
            group = root / f"metavae-bench-{os.getpid()}"
            try:
                group.mkdir(exist_ok=True)
                (group / limit).write_text(str(limit_bytes))
            except OSError as e:
                raise SystemExit(f"cannot create a memory cgroup under {root} ({e}); run as root, or skip 'limited'")
            return group, peak, "memory.oom_control" if root == CGROUP_V1 else "memory.events"
    raise SystemExit("no memory cgroup (v1 /sys/fs/cgroup/memory or v2 /sys/fs/cgroup/unified) on this machine")


def _empty(group: Path) -> None:
    """Kill what is left in a cgroup (a timed-out worker) and remove it."""
    import signal

    for pid in (group / "cgroup.procs").read_text().split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    for _ in range(50):
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def section_limited(device, steps, folder: Path, limit_gb: float, family_gb: float, timeout_s: int = 600) -> dict:
    """A family ``family_gb`` on disk, trained by processes allowed ``limit_gb`` of memory (page cache
    included): the mapped storage against the padded one, each in a fresh memory cgroup, cold cache."""
    rows = int(family_gb * 1e9 / (MAPPED_K * MAPPED_EVENT))
    total = write_family(folder, rows)
    print(f"  wrote {total / 1e9:.2f} GB under {folder}; each worker may use {limit_gb:.2f} GB", flush=True)
    out = []
    try:
        for storage in ("mapped", "padded"):
            evict(folder)
            group, peak_file, oom_file = memory_cgroup(int(limit_gb * 1e9))
            try:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "mapped", "--storage", storage,
                       "--dir", str(folder), "--steps", str(steps)]
                enter = f"echo $$ > {group / 'cgroup.procs'} && exec \"$@\""
                t = time.perf_counter()
                try:
                    run = subprocess.run(["sh", "-c", enter, "sh", *cmd], capture_output=True, text=True, check=False,
                                         timeout=timeout_s)
                    rc, stdout, stderr = run.returncode, run.stdout, run.stderr
                except subprocess.TimeoutExpired as e:  # at the cap the kernel reclaims page cache instead of
                    rc, stdout, stderr = None, "", str(e.stderr or "")  # killing: the padded worker thrashes
                row = {"storage": storage, "returncode": rc, "timed_out": rc is None, "timeout_s": timeout_s,
                       "wall_s": round(time.perf_counter() - t, 1),
                       "cgroup_peak_mb": round(int((group / peak_file).read_text()) / 1e6, 1),
                       "oom": (group / oom_file).read_text().split()}
                if rc == 0:
                    row.update(json.loads(stdout.strip().splitlines()[-1]))
                else:
                    row["error_tail"] = stderr[-400:]
            finally:
                _empty(group)
            out.append(row)
            print(f"  storage={storage:7s} rc {row['returncode']}  cgroup peak {row['cgroup_peak_mb']:.0f} MB  "
                  + (f"{row['step_ms']:.1f} ms/step, peak RSS {row['peak_rss_mb']:.0f} MB" if rc == 0
                     else f"did not finish{f' in {timeout_s} s' if rc is None else ''}"), flush=True)
    finally:
        for f in folder.glob("*.npy"):
            f.unlink()
        folder.rmdir()
    return {"family_gb": round(total / 1e9, 2), "memory_limit_gb": limit_gb, "worker_timeout_s": timeout_s,
            "files": MAPPED_K,
            "rows_per_file": rows, "event": MAPPED_EVENT, "rows": out}


def _subprocess(args) -> dict:
    env = dict(os.environ)
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"benchmark worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the existing sweep and the authors' step -------------------------------------------------------
def time_steps(model, data, B, N, device, steps, pool=None, amp=None):
    """Median and mean seconds per full training step and FLOPs per step (kept for other scripts)."""
    s = Stepper(model, data, B, N, device, pool, amp)
    for _ in range(2):
        s()
    flops = s.flops()
    for _ in range(steps):
        s.timed()
    return statistics.median(s.times), statistics.mean(s.times), flops


def sweep(device, steps):
    """Step time of the MLP MetaVAE as K, B and N vary around (9, 100, 10)."""
    base = {"K": 9, "B": 100, "N": 10}
    grid = {"K": [1, 3, 9, 18], "B": [25, 50, 100, 200], "N": [1, 5, 10, 20]}
    out = {}
    for axis, values in grid.items():
        out[axis] = []
        for v in values:
            p = {**base, axis: v}
            data = make_data(p["K"], (784,), 2000, device)
            model = build_mlp_metavae((784,), p["K"]).to(device)
            med, _, _ = time_steps(model, data, p["B"], p["N"], device, steps)
            out[axis].append({"value": v, "step_ms": round(med * 1e3, 2)})
            print(f"  sweep {axis}={v}: {med * 1e3:.1f} ms", flush=True)
    return out


def plot_sweep(sweep_result, path: Path, device_name: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, (axis, rows) in zip(axes, sweep_result.items()):
        ax.plot([r["value"] for r in rows], [r["step_ms"] for r in rows], "o-")
        ax.set_xlabel(axis)
        ax.set_ylabel("ms per training step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"MLP MetaVAE step time around K=9, B=100, N=10 ({device_name})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    ap.add_argument("--quick", action="store_true",
                    help="2 steps, only the mlp and conv sections, conv at B<=4 (a smoke test)")
    ap.add_argument("--only", default=None, help=f"comma-separated sections of {', '.join(SECTIONS)}")
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    ap.add_argument("--mapped-dir", type=Path, default=Path("/tmp/metavae-bench-family"))
    ap.add_argument("--memory-limit-gb", type=float, default=1.0, help="limited: memory each worker may use")
    ap.add_argument("--limited-family-gb", type=float, default=4.0, help="limited: the family's size on disk")
    ap.add_argument("--limited-timeout-s", type=int, default=600, help="limited: a worker not done by then is stopped")
    ap.add_argument("--conv-batch", type=int, default=32, help="queries per distribution in the conv rows")
    ap.add_argument("--archive-previous", action="store_true",
                    help="copy the stored results of this device under 'previous' before updating them")
    ap.add_argument("--epoch-steps", type=int, default=None, help="steps of the epoch section (default: all 600)")
    ap.add_argument("--epoch-pool", type=int, default=None,
                    help="context pool of the epoch section's steps (stored as epoch_60k_poolP)")
    ap.add_argument("--worker", choices=("ksweep", "mapped"), help=argparse.SUPPRESS)
    ap.add_argument("--K", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--subset", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--storage", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "ksweep":
        print(json.dumps(worker_ksweep(args.K, args.subset or None, args.steps)))
        return 0
    if args.worker == "mapped":
        print(json.dumps(worker_mapped(args.dir, args.storage, args.steps)))
        return 0

    device = resolve_device(args.device)
    steps = 2 if args.quick else args.steps
    sections = args.only.split(",") if args.only else (["mlp", "conv"] if args.quick else list(SECTIONS))
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    device_name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).replace(" ", "_")
    pk = peaks(device)
    print(f"device {device_name}: dense matmul peak fp32 {pk['fp32'] / 1e9:.1f}, bf16 {pk['bf16'] / 1e9:.1f} GFLOP/s, "
          f"{torch.get_num_threads()} threads", flush=True)

    merged = json.loads(args.out.read_text()) if args.out.exists() else {}
    res = merged.get(device_name, {})
    if args.archive_previous and res.get("measured_at"):  # keep the stored run whole (the README may quote it)
        import copy

        merged.setdefault("previous", {}).setdefault(f"{device_name} {res['measured_at']}", copy.deepcopy(res))
    res.update({"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "peak_gflops": round(pk["fp32"] / 1e9, 2),
                "bf16_peak_gflops": round(pk["bf16"] / 1e9, 2)})
    if device.type == "cpu":
        res["cpu_bf16"] = cpu_bf16_support()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    res.setdefault("sections_measured_at", {})

    def done(name, **extra):
        res["sections_measured_at"][name] = {"at": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_at_start": load,
                                             "steps": steps, "threads": torch.get_num_threads(), **extra}

    if "mlp" in sections:
        res.update(section_mlp(device, steps))
        done("mlp")
    if "conv" in sections:
        conv_batch = min(args.conv_batch, 4) if args.quick else args.conv_batch
        res.update(section_conv(device, max(1, steps // 3), conv_batch))
        done("conv", steps=max(1, steps // 3), batch=conv_batch)
    if "epoch" in sections:
        key = "epoch_60k" + (f"_pool{args.epoch_pool}" if args.epoch_pool else "")
        res[key] = section_epoch(device, args.epoch_steps, pool=args.epoch_pool)
        done("epoch", context_pool=args.epoch_pool)
    if "ksweep" in sections:
        res["k_sweep"] = section_ksweep(device, steps)
        done("ksweep")
    if "mapped" in sections:
        res["mapped_family"] = section_mapped(device, steps, args.mapped_dir)
        done("mapped")
    if "limited" in sections:
        res["mapped_under_memory_limit"] = section_limited(device, steps, args.mapped_dir, args.memory_limit_gb,
                                                           args.limited_family_gb, args.limited_timeout_s)
        done("limited")
    if "sweep" in sections:
        res["sweep"] = sweep(device, max(3, steps // 3))
        plot_sweep(res["sweep"], args.out.with_name(f"step_time_sweep_{device_name}.png"), device_name)
        done("sweep")
    if "reference" in sections and device.type == "cpu":  # last: its 1.7 GB of context caches inflate peak RSS
        sys.path.insert(0, str(HERE))
        from reference_step import reference_step_time

        ref_peak = matmul_peak(device)
        ref = {k: round(v, 1) for k, v in reference_step_time(steps=max(3, steps // 2)).items()}
        ref["peak_gflops"] = round(ref_peak / 1e9, 2)
        res["reference_mlp"] = ref
        print(f"{'reference_mlp':22s} {ref['step_ms']:9.1f} ms/step  (data {ref['data_ms']:.0f} ms, "
              f"model {ref['model_ms']:.0f} ms)  epoch {ref['paper_epoch_s']:.0f} s", flush=True)
        done("reference")
    if "reference" in sections and "reference_mlp" in res:  # only against a reference measured in this run
        for row_name in [k for k in res if k.startswith("metavae_mlp")]:
            row = res[row_name]
            row["speedup_vs_reference"] = round(res["reference_mlp"]["step_ms"] / row["step_ms"], 2)

    merged[device_name] = res
    if device.type == "cpu" and "cuda" not in str(merged.keys()):
        merged["cuda_note"] = "no GPU in the sessions that measured these numbers: no CUDA rows yet"
    atomic_write_text(json.dumps(merged, indent=2) + "\n", args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
