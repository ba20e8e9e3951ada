"""MetaDataset: vectorized query/context sampling without replacement, from the right place."""
import pytest
import torch

from metavae import MetaDataset


def _tagged(sizes, dim=3):
    """Distribution k's points carry (k, point id) so every draw can be traced back."""
    return [torch.stack([torch.full((n,), float(k)), torch.arange(n).float(), torch.zeros(n)], 1)[:, :dim]
            for k, n in enumerate(sizes)]


@pytest.mark.parametrize("sizes,N", [([30, 50, 40], 8), ([500, 800], 5)])  # topk path, Floyd path
@pytest.mark.parametrize("exclude", [False, True])
def test_context_without_replacement_from_same_distribution_and_part(sizes, N, exclude):
    ds = MetaDataset(_tagged(sizes), val_fraction=0.0, test_fraction=0.0)
    g = torch.Generator().manual_seed(0)
    b = ds.sample(16, N, generator=g, exclude_query=exclude)
    assert b.x.shape == (len(sizes), 16, 3) and b.context.shape == (len(sizes), 16, N, 3)
    # every context point comes from the query's own distribution
    assert torch.equal(b.context[..., 0], b.x[..., 0:1].expand(-1, -1, N))
    ids = b.context[..., 1]
    for k in range(len(sizes)):
        for q in range(16):
            assert len(set(ids[k, q].tolist())) == N, "a context set repeats a point"
            assert ids[k, q].max() < sizes[k]
            if exclude:
                assert b.x[k, q, 1] not in ids[k, q]


def test_context_comes_from_the_same_part():
    data = _tagged([100, 100])
    ds = MetaDataset(data, val_fraction=0.2, test_fraction=0.2, seed=1)
    val_ids = {k: set(ds.part("val").data[k, :20, 1].tolist()) for k in range(2)}
    b = ds.sample(10, 15, part="val", generator=torch.Generator().manual_seed(0))
    for k in range(2):
        assert set(b.context[k, ..., 1].flatten().tolist()) <= val_ids[k]
        assert set(b.x[k, :, 1].tolist()) <= val_ids[k]


def test_sampling_is_uniform_over_points():
    ds = MetaDataset(_tagged([20]), val_fraction=0.0, test_fraction=0.0)
    b = ds.sample(2000, 5, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(b.context[0, ..., 1].long().flatten(), minlength=20).float()
    expected = 2000 * 5 / 20
    assert (counts - expected).abs().max() < 5 * expected**0.5


def test_reproducible_under_seed():
    ds = MetaDataset(_tagged([60, 70]))
    a = ds.sample(8, 4, generator=torch.Generator().manual_seed(3))
    b = ds.sample(8, 4, generator=torch.Generator().manual_seed(3))
    c = ds.sample(8, 4, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.x, b.x) and torch.equal(a.context, b.context)
    assert not torch.equal(a.context, c.context)


def test_epoch_visits_every_point_once_and_wraps_smaller():
    ds = MetaDataset(_tagged([40, 25]), val_fraction=0.0, test_fraction=0.0)
    batches = list(ds.epoch(10, 3, generator=torch.Generator().manual_seed(0)))
    assert len(batches) == 4
    seen0 = torch.cat([b.x[0, :, 1] for b in batches])
    assert sorted(seen0.tolist()) == list(range(40))
    seen1 = torch.cat([b.x[1, :, 1] for b in batches])
    assert set(seen1.tolist()) == set(range(25))


def test_shared_context_is_one_set_per_distribution():
    ds = MetaDataset(_tagged([50, 50]))
    b = ds.sample(7, 6, generator=torch.Generator().manual_seed(0), shared_context=True)
    assert b.context.shape == (2, 1, 6, 3)
    with pytest.raises(ValueError, match="exclude_query"):
        ds.sample(7, 6, shared_context=True, exclude_query=True)


def test_labels_follow_their_points_and_uint8_becomes_float():
    imgs = [torch.randint(0, 256, (30, 1, 4, 4), dtype=torch.uint8) for _ in range(2)]
    labels = [torch.arange(30) % 10 for _ in range(2)]
    ds = MetaDataset(imgs, labels=labels, val_fraction=0.0, test_fraction=0.0)
    p = ds.part("train")
    b = ds.sample(5, 2, generator=torch.Generator().manual_seed(0))
    assert b.x.dtype == torch.float32 and 0 <= b.x.min() and b.x.max() <= 1
    for k in range(2):
        for q in range(5):
            match = (p.data[k].float() / 255 == b.x[k, q]).flatten(1).all(1).nonzero().flatten()
            assert int(p.labels[k, match[0]]) == int(b.labels[k, q])


def test_select_keeps_the_chosen_distributions():
    ds = MetaDataset(_tagged([30, 40, 50]), names=["a", "b", "c"])
    sub = ds.select([2, 0])
    assert sub.names == ["c", "a"] and len(sub) == 2
    assert set(sub.part("train").data[0, :, 0].tolist()) == {2.0}


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: MetaDataset([]), "at least one distribution"),
        (lambda: MetaDataset([torch.zeros(10, 2), torch.zeros(0, 2)]), "distribution 1 is empty"),
        (lambda: MetaDataset([torch.zeros(10)]), "expected \\(points, \\*event\\)"),
        (lambda: MetaDataset([torch.zeros(10, 2), torch.zeros(10, 3)]), "same event shape"),
        (lambda: MetaDataset([torch.zeros(10, 2)], labels=[torch.zeros(9)], val_fraction=0, test_fraction=0),
         "10 points but 9 labels"),
        (lambda: MetaDataset([torch.zeros(3, 2)]), "too few to split"),
        (lambda: MetaDataset([torch.zeros(10, 2)], val_fraction=1.5), "val_fraction"),
    ],
)
def test_bad_inputs_fail_clearly(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_context_larger_than_distribution_fails_clearly():
    ds = MetaDataset([torch.zeros(10, 2), torch.zeros(50, 2)], val_fraction=0, test_fraction=0)
    with pytest.raises(ValueError, match="context size 20 exceeds the 10 points available in distribution 0"):
        ds.sample(4, 20)


def test_pooled_context_draws_distinct_members_of_one_distinct_pool():
    ds = MetaDataset(_tagged([300, 400]), val_fraction=0.0, test_fraction=0.0)
    b = ds.sample(12, 6, generator=torch.Generator().manual_seed(0), context_pool=20)
    pool, index = b.context.pool, b.context.index
    assert pool.shape == (2, 20, 3) and index.shape == (2, 12, 6)
    for k in range(2):
        assert set(pool[k, :, 0].tolist()) == {float(k)}
        assert len(set(pool[k, :, 1].tolist())) == 20  # the pool has no repeats
        for q in range(12):
            assert len(set(index[k, q].tolist())) == 6  # nor does any query's set
    sets = b.context.materialize()
    assert sets.shape == (2, 12, 6, 3) and torch.equal(sets[1, 3, 2], pool[1, index[1, 3, 2]])
    with pytest.raises(ValueError, match="smaller than the context size"):
        ds.sample(4, 6, context_pool=5)
