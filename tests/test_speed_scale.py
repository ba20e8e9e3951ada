"""Speed and scale: bf16 on the CPU with float32 losses, a subset of the distributions per step
(unselected decoders untouched), and memory-mapped families (the same batches as in memory)."""
import numpy as np
import pytest
import torch

from metavae import Gaussian, MetaDataset, Trainer, TrainConfig, build_mlp_metavae, seed_everything
from metavae.data.files import read_family
from metavae.models import make_model
from metavae.paper.models.compiled import build_compiled_inference
from metavae.paper.models.expfam_metavae import build_expfam_metavae
from metavae.nets.mlp import bank_parameters, sparse_bank_gradients
from metavae.training import make_optimizer
from metavae.training.optim import RowAdam, clip_grad_norm
from metavae.training.precision import PARAMETER_MODULES, bf16_autocast


def _points(K=3, n=60, d=4, seed=0, unit=False):
    g = torch.Generator().manual_seed(seed)
    if unit:
        return MetaDataset([torch.rand(n + 5 * k, d, generator=g) for k in range(K)], seed=0)
    return MetaDataset([torch.randn(n + 7 * k, d, generator=g) + k for k in range(K)], seed=0)


def _images(K=2):
    g = torch.Generator().manual_seed(1)
    return MetaDataset([torch.rand(40, 1, 16, 16, generator=g) for _ in range(K)], seed=0)


def _labelled():
    g = torch.Generator().manual_seed(2)
    sims = [torch.stack([torch.rand(60, generator=g), (torch.rand(60, generator=g) < 0.2).float()], -1)
            for _ in range(3)]
    return MetaDataset(sims, labels=[torch.rand(60, generator=g) for _ in range(3)], seed=0)


def _expfam_data():
    g = torch.Generator().manual_seed(3)
    return MetaDataset([torch.rand(60, 20, 2, generator=g) + 0.1 for _ in range(3)], seed=0)


def _physics_model():
    from metavae.paper.models.standardize import StandardizeOnContext

    return build_compiled_inference(2, z_dim=1, hidden_widths=(16,), summary_widths=(16,), preprocess=StandardizeOnContext())


CASES = {  # every model kind: (builder, data, sample options)
    "mlp_metavae": (lambda: build_mlp_metavae((4,), 3, z_dim=2, hidden_widths=(16,), summary_widths=(16, 16),
                                              likelihood=Gaussian(0.1)), _points, {}),
    "mlp_mog": (lambda: build_mlp_metavae((4,), 3, z_dim=2, latent="categorical", likelihood=Gaussian(0.1),
                                          hidden_widths=(16,), summary_widths=(16,), decoder_widths=(), center=True,
                                          decoder_scale=5.0), _points, {"shared_context": True}),
    "mlp_pooled": (lambda: build_mlp_metavae((4,), 3, z_dim=2, hidden_widths=(16,), summary_widths=(16,)),
                   lambda: _points(unit=True), {"context_pool": 8}),
    "conv_metavae": (lambda: make_model("metavae", arch="conv", event_shape=(1, 16, 16), n_distributions=2,
                                        channels=(4, 8, 8), groups=4, hidden=16, summary_widths=(16, 16)), _images, {}),
    "ns": (lambda: make_model("ns", event_shape=(4,), c_dim=3, z_dim=2, hidden=16, decoder_hidden=32),
           lambda: _points(unit=True), {}),
    "vhe": (lambda: make_model("vhe", event_shape=(4,), c_dim=3, z_dim=2, hidden=16, decoder_hidden=32),
            lambda: _points(unit=True), {}),
    "vhe_vampprior": (lambda: make_model("vhe-vampprior", event_shape=(4,), c_dim=3, z_dim=2, hidden=16,
                                         decoder_hidden=32, n_components=5, n_pseudo=3),
                      lambda: _points(unit=True), {}),
    "conv_ns": (lambda: make_model("ns", arch="conv", event_shape=(1, 16, 16), c_dim=3, z_dim=2, hidden=16,
                                   channels=(4, 8, 8), groups=4), _images, {}),
    "expfam": (lambda: build_expfam_metavae(["gaussian", "lognormal", "exponential"], draw_features=(8,),
                                            meta_summary=(8,), hidden_widths=(16,), balance=True),
               _expfam_data, {"shared_context": True}),
    "physics_compiled": (_physics_model, _labelled, {"shared_context": True}),
}


# --- bf16 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_loss_is_float32_and_close_on_the_cpu(name):
    build, data_fn, kw = CASES[name]
    seed_everything(0)
    model, data = build(), data_fn()
    batch = data.sample(8, 4, "train", torch.Generator().manual_seed(0), **kw)
    torch.manual_seed(0)
    with torch.no_grad():
        ref = float(model.loss(batch)["loss"])
    torch.manual_seed(0)
    seen = {}
    with bf16_autocast(model, "cpu"):  # hooks registered inside run after the policy's casts
        hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(o))
                 for n in PARAMETER_MODULES if isinstance(getattr(model, n, None), torch.nn.Module)]
        loss = model.loss(batch)["loss"]
    for h in hooks:
        h.remove()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(float(loss.detach()) - ref) <= 2e-2 * abs(ref)
    assert seen
    for n, outs in seen.items():  # every distribution's parameters are float32
        for out in outs:
            assert (out if isinstance(out, torch.Tensor) else out[0]).dtype == torch.float32, n
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    assert not any(getattr(model, n)._forward_hooks for n in PARAMETER_MODULES
                   if isinstance(getattr(model, n, None), torch.nn.Module)), "hooks left behind"


def test_bf16_decoder_output_layer_runs_in_float32():
    seed_everything(0)
    model = CASES["mlp_mog"][0]()
    z = torch.randn(3, 5, 2)
    ref = model.decode(z, torch.arange(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.decode(z, torch.arange(3))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # bf16 would be off by ~1e-2 at |x| ~ 5


@pytest.mark.parametrize("dist", [None, torch.tensor([2, 0])])
def test_bf16_decoder_output_layer_gradients_are_bf16_products_close_to_fp32(dist):
    """The last layer's forward is float32, its gradient products bf16 (as every other layer's
    under autocast), and the gradients it gives agree with float32's to bf16 precision."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Products(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.baddbmm):
                self.dtypes.append(args[-1].dtype)
            return func(*args, **(kwargs or {}))

    seed_everything(0)
    bank = build_mlp_metavae((32,), 3, z_dim=4, hidden_widths=(16,), summary_widths=(16,), decoder_widths=(24,)).decoder
    z = torch.randn(3 if dist is None else 2, 20, 4)
    grads = {}
    for amp in (False, True):
        bank.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = bank(z, dist)
        assert out.dtype == torch.float32
        with Products() as seen:
            (out ** 2).mean().backward()
        grads[amp] = [p.grad.to_dense().clone() for p in bank.parameters()]
        if amp:
            assert seen.dtypes and all(d == torch.bfloat16 for d in seen.dtypes), seen.dtypes
    for ref, got in zip(grads[False], grads[True]):
        assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
    assert not all(torch.equal(r, g) for r, g in zip(grads[False], grads[True]))  # bf16 did run


def test_bf16_training_runs_and_leaves_no_hooks():
    seed_everything(0)
    model = CASES["mlp_metavae"][0]()
    cfg = TrainConfig(epochs=1, batch_size=8, context_size=4, lr=3e-3, steps_per_epoch=3, amp="bf16")
    hist = Trainer(model, _points(), cfg, progress=False).fit()
    assert np.isfinite(hist[-1]["train_loss"]) and np.isfinite(hist[-1]["val_loss"])
    assert not model.head._forward_hooks and not model.decoder._forward_hooks


# --- a subset of the distributions per step -----------------------------------------------
def _mlp(K, seed=0):
    seed_everything(seed)
    return build_mlp_metavae((4,), K, z_dim=2, hidden_widths=(8,), summary_widths=(8,), likelihood=Gaussian(0.5))


def _cfg(**kw):
    base = dict(epochs=1, batch_size=8, context_size=4, lr=1e-2, steps_per_epoch=3, seed=1)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("value", [0, -1])
def test_distributions_per_step_below_one_is_refused(value):
    with pytest.raises(ValueError, match="distributions_per_step"):
        TrainConfig(distributions_per_step=value)


def test_distributions_per_step_above_k_is_refused():
    with pytest.raises(ValueError, match="distributions_per_step 4 exceeds the 3 distributions"):
        Trainer(_mlp(3), _points(), _cfg(distributions_per_step=4), progress=False)


def test_distributions_per_step_under_compile_matches_eager(monkeypatch):
    """Under compile the bank gradients are dense and RowAdam is told the rows: the same weights as
    the eager sparse path. The ``aot_eager`` backend traces what inductor would (dynamo and
    AOTAutograd, where a sparse autograd Function fails) without inductor's C++ build, and keeps
    eager numerics, so the two runs agree bit for bit."""
    K = 5
    eager = _mlp(K)
    Trainer(eager, _points(K), _cfg(distributions_per_step=2, steps_per_epoch=4), progress=False).fit()
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module: real(module, backend="aot_eager"))
    compiled = _mlp(K)
    start = [p.detach().clone() for p in bank_parameters(compiled)]
    trainer = Trainer(compiled, _points(K), _cfg(distributions_per_step=2, steps_per_epoch=4, compile=True),
                      progress=False)
    trainer.fit()
    for a, b in zip(eager.state_dict().values(), compiled.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    bank = next(bank_parameters(compiled))
    drawn = trainer.optimizer.state[bank]["row_step"].flatten() > 0
    assert not drawn.all(), "every decoder was drawn: the test shows nothing about untouched rows"
    assert torch.equal(bank.detach()[~drawn], start[0][~drawn])


def _conv(K):
    seed_everything(0)
    return make_model("metavae", arch="conv", event_shape=(1, 16, 16), n_distributions=K, channels=(4, 8, 8),
                      groups=4, hidden=16, summary_widths=(16, 16))


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_unselected_decoders_and_their_adam_state_are_untouched(arch):
    K = 5 if arch == "mlp" else 3
    model = _mlp(K) if arch == "mlp" else _conv(K)
    data = _points(K) if arch == "mlp" else _images(K)
    trainer = Trainer(model, data, _cfg(distributions_per_step=2), progress=False)
    bank = list(bank_parameters(model))
    assert bank and isinstance(trainer.optimizer, RowAdam)
    seed_everything(0)
    trainer.gen.manual_seed(0)
    history = {}  # weights and optimizer state before each step, per bank parameter
    batches = trainer._subset_batches()
    for step in range(3):
        batch = next(batches)
        before = [(p.detach().clone(), {k: v.clone() for k, v in trainer.optimizer.state[p].items()}) for p in bank]
        with trainer._autocast():
            loss = model.loss(batch)["loss"]
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in bank:
            assert p.grad.is_sparse and sorted(p.grad.coalesce().indices()[0].tolist()) == batch.dist.tolist()
        trainer.optimizer.step()
        chosen = set(batch.dist.tolist())
        others = [k for k in range(K) if k not in chosen]
        assert len(chosen) == 2
        for p, (w0, st0) in zip(bank, before):
            st = trainer.optimizer.state[p]
            assert torch.equal(p.detach()[others], w0[others]), "an unselected decoder moved"
            assert not torch.equal(p.detach()[sorted(chosen)], w0[sorted(chosen)])
            for key, value in st.items():
                if st0:
                    assert torch.equal(value[others], st0[key][others]), f"unselected {key} changed"
                else:
                    assert not value[others].any(), f"unselected {key} was written"
            for k in chosen:
                history.setdefault((id(p), k), 0)
                history[(id(p), k)] += 1
                assert float(st["row_step"][k]) == history[(id(p), k)]  # per-row step counts


def test_row_adam_equals_adam_when_every_row_is_in_every_step():
    torch.manual_seed(0)
    shared = torch.nn.Parameter(torch.randn(4, 3))
    bank = torch.nn.Parameter(torch.randn(5, 3, 2))
    shared2, bank2 = (torch.nn.Parameter(t.detach().clone()) for t in (shared, bank))
    ours = RowAdam([shared, bank], [bank], lr=1e-2)
    theirs = torch.optim.Adam([shared2, bank2], lr=1e-2)
    for step in range(5):
        g1, g2 = torch.randn(4, 3), torch.randn(5, 3, 2)
        shared.grad, shared2.grad = g1.clone(), g1.clone()
        if step % 2:  # a sparse gradient naming every row, or a dense one
            bank.grad = torch.sparse_coo_tensor(torch.arange(5).unsqueeze(0), g2.clone(), bank.shape,
                                                check_invariants=False)
        else:
            bank.grad = g2.clone()
        bank2.grad = g2.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(shared, shared2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bank, bank2, rtol=1e-5, atol=1e-6)


def test_row_adam_state_round_trips_through_its_state_dict():
    model = _mlp(4)
    trainer = Trainer(model, _points(4), _cfg(distributions_per_step=2), progress=False)
    trainer.fit()
    state = trainer.optimizer.state_dict()
    fresh = RowAdam(model.parameters(), bank_parameters(model), 1e-2)
    fresh.load_state_dict(state)
    for p in bank_parameters(model):
        a, b = trainer.optimizer.state[p], fresh.state[p]
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_subset_training_resumes_to_the_same_weights(tmp_path):
    def run(epochs, out):
        return Trainer(_mlp(5), _points(5), _cfg(epochs=epochs, distributions_per_step=2, grad_clip=1.0),
                       out_dir=out, progress=False)

    run(3, tmp_path / "a").fit()
    run(2, tmp_path / "b").fit()
    seed_everything(99)
    run(3, tmp_path / "b").fit()
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_default_training_is_the_plain_loop():
    """distributions_per_step=None: the trainer is exactly Adam over full-K epochs (bit for bit)."""
    data = _points()
    trained = _mlp(3)
    Trainer(trained, data, _cfg(epochs=1, steps_per_epoch=4, val_steps=1), progress=False).fit()
    model = _mlp(3)
    seed_everything(1)
    gen = torch.Generator().manual_seed(1)
    opt = make_optimizer(model.parameters(), 1e-2)
    for i, batch in enumerate(data.epoch(8, 4, "train", gen)):
        if i == 4:
            break
        loss = model.loss(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for (k, a), b in zip(trained.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", ["mlp_metavae", "mlp_mog", "conv_metavae", "vhe", "expfam", "physics_compiled"])
def test_every_model_trains_on_a_subset_of_distributions(name):
    build, data_fn, kw = CASES[name]
    seed_everything(0)
    model, data = build(), data_fn()
    cfg = _cfg(lr=1e-3, distributions_per_step=2, grad_clip=5.0, amp="bf16", **kw)
    hist = Trainer(model, data, cfg, progress=False).fit()
    assert np.isfinite(hist[-1]["train_loss"]) and np.isfinite(hist[-1]["val_loss"])


def test_clip_grad_norm_matches_torch_for_dense_and_sparse():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(3, 2))
    b = torch.nn.Parameter(torch.randn(4, 2, 2))
    a2, b2 = (torch.nn.Parameter(t.detach().clone()) for t in (a, b))
    ga, gb = torch.randn(3, 2), torch.zeros(4, 2, 2)
    gb[[0, 2]] = torch.randn(2, 2, 2)
    a.grad = ga.clone()
    b.grad = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), gb[[0, 2]], b.shape, check_invariants=False)
    a2.grad, b2.grad = ga.clone(), gb.clone()
    n1 = clip_grad_norm([a, b], 0.5)
    n2 = torch.nn.utils.clip_grad_norm_([a2, b2], 0.5)
    torch.testing.assert_close(n1, n2)
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad.to_dense(), b2.grad)


def test_sample_with_dists_gathers_only_those_rows():
    data = _points(5)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    batch = data.sample(6, 3, "train", g1, dists=[3, 1])
    assert batch.dist.tolist() == [3, 1] and batch.x.shape == (2, 6, 4) and batch.context.shape == (2, 6, 3, 4)
    part = data.part("train")
    for r, k in enumerate([3, 1]):  # every point comes from its own distribution's part
        rows = part.data[k, : int(part.lengths[k])]
        assert all((rows == x).all(-1).any() for x in batch.x[r])
    sub = data.select([3, 1]).sample(6, 3, "train", g2)  # the same draws as a dataset of those two
    assert torch.equal(sub.x, batch.x) and torch.equal(sub.context, batch.context)
    with pytest.raises(ValueError, match="repeat"):
        data.sample(2, 1, dists=[1, 1])
    with pytest.raises(ValueError, match="indices in"):
        data.sample(2, 1, dists=[7])


def test_sparse_gradients_only_inside_the_block():
    model = _mlp(4)
    z = torch.randn(2, 3, 2)
    with sparse_bank_gradients():
        out = model.decode(z, torch.tensor([0, 2]))
    out.sum().backward()
    assert all(p.grad.is_sparse for p in bank_parameters(model))
    model.zero_grad(set_to_none=True)
    model.decode(z, torch.tensor([0, 2])).sum().backward()
    assert not any(p.grad.is_sparse for p in bank_parameters(model))


# --- memory-mapped families ----------------------------------------------------------------
def _write_family(tmp_path, dtype=np.uint8, K=3):
    rng = np.random.default_rng(0)
    arrays = []
    for k in range(K):
        a = (rng.integers(0, 256, (50 + 9 * k, 6)) if dtype == np.uint8 else rng.normal(size=(50 + 9 * k, 6)))
        a = a.astype(dtype)
        np.save(tmp_path / f"d{k}.npy", a)
        arrays.append(a)
    return arrays


@pytest.mark.parametrize("dtype", [np.uint8, np.float64])
def test_mapped_storage_gives_the_padded_batches(tmp_path, dtype):
    arrays = _write_family(tmp_path, dtype)
    fam = read_family(tmp_path)
    assert all(isinstance(a, np.memmap) for a in fam.points)
    labels = [np.arange(len(a)) % 4 for a in arrays]
    mem = MetaDataset([torch.as_tensor(a) for a in arrays], labels=labels, seed=3)
    mapped = MetaDataset(fam.points, labels=labels, seed=3, storage="mapped")
    for kw in ({}, {"exclude_query": True}, {"shared_context": True}, {"context_pool": 4},
               {"dists": [2, 0]}):
        for part in ("train", "val"):
            g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
            a, b = mem.sample(5, 3, part, g1, **kw), mapped.sample(5, 3, part, g2, **kw)
            assert torch.equal(a.x, b.x) and torch.equal(a.labels, b.labels) and a.dist.tolist() == b.dist.tolist()
            ca, cb = a.context, b.context
            if hasattr(ca, "pool"):
                assert torch.equal(ca.pool, cb.pool) and torch.equal(ca.index, cb.index)
            else:
                assert torch.equal(ca, cb)
        g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
        kw.pop("dists", None)
        for a, b in zip(mem.epoch(7, 2, "test", g1, **kw), mapped.epoch(7, 2, "test", g2, **kw)):
            assert torch.equal(a.x, b.x)
    assert torch.equal(mem.part("train").data, mapped.part("train").data)
    assert mapped.part("train").gather(torch.zeros(1, 1, dtype=torch.long)).dtype == (
        torch.uint8 if dtype == np.uint8 else torch.float32)


def test_mapped_training_equals_in_memory_training(tmp_path):
    arrays = _write_family(tmp_path, np.float64)
    fam = read_family(tmp_path)
    runs = []
    for data in (MetaDataset([torch.as_tensor(a) for a in arrays], seed=0),
                 MetaDataset(fam.points, seed=0, storage="mapped")):
        seed_everything(0)
        model = build_mlp_metavae((6,), 3, z_dim=2, hidden_widths=(8,), summary_widths=(8,), likelihood=Gaussian(1.0))
        Trainer(model, data, _cfg(epochs=2), progress=False).fit()
        runs.append(model.state_dict())
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


def test_mapped_checks_name_the_bad_distribution(tmp_path, monkeypatch):
    import metavae.data.meta as meta

    monkeypatch.setattr(meta, "FINITE_CHECK_CHUNK", 12)  # several chunks per array
    a = np.zeros((20, 6))
    a[13, 2] = np.nan
    a[17, 0] = np.inf
    with pytest.raises(ValueError, match="distribution 1: point 13 holds a non-finite value.*2 such"):
        MetaDataset([np.ones((20, 6)), a], storage="mapped")
    with pytest.raises(ValueError, match="unknown storage"):
        MetaDataset([np.ones((20, 6))], storage="disk")
    with pytest.raises(ValueError, match="same event shape"):
        MetaDataset([np.ones((20, 6)), np.ones((20, 5))], storage="mapped")


def test_prefetch_passes_batches_and_errors_through_and_stops_cleanly():
    from metavae.training.trainer import _prefetched

    def failing():
        yield from range(3)
        raise RuntimeError("bad batch")

    got = []
    with pytest.raises(RuntimeError, match="bad batch"):
        for b in _prefetched(failing()):
            got.append(b)
    assert got == [0, 1, 2]
    it = _prefetched(iter(range(1000)))
    assert [next(it), next(it)] == [0, 1]
    it.close()  # the worker stops; nothing hangs
