"""The batched transforms against PIL (the reference's own pipeline), grids, meta-splits, cache.

Measured agreement with PIL: exact, every pixel, for all 51 grid values on real MNIST digits and
on uniform-noise images (noise makes every rounding and boundary case visible), so the tests
assert equality.
"""

import math

import numpy as np
import pytest
import torch

from metavae.paper.data import transforms as T
from metavae.paper.data.mnist import load_mnist

Image = pytest.importorskip("PIL.Image")



@pytest.fixture(scope="module")
def digits(shared_mnist):
    images, _ = load_mnist(shared_mnist, "test", download=False)
    return images[:8].clone()


@pytest.fixture(scope="module")
def noise():
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8))


def old_torchvision_shear(s, size=28):
    """torchvision<=0.4 inverse matrix for F.affine(angle=0, shear=s), written out by hand."""
    c, r = size * 0.5 + 0.5, math.radians(s)
    return [1.0, math.tan(r), -math.tan(r) * c, 0.0, 1 / math.cos(r), c - c / math.cos(r)]


def pil_reference(image, axis, value):
    im = Image.fromarray(image.numpy())
    if axis == "rotation":
        out = im.rotate(value, resample=Image.NEAREST)
    elif axis == "shear":
        out = im.transform((28, 28), Image.AFFINE, old_torchvision_shear(value), resample=Image.NEAREST)
    else:
        w = 28 * value
        i = (28 - w) // 2
        out = im.crop((i, i, i + w, i + w)).resize((28, 28), Image.BILINEAR)
    return torch.from_numpy(np.array(out))


# --------------------------------------------------------------------------- PIL agreement


@pytest.mark.parametrize("axis", T.AXES)
def test_matches_pil_on_whole_grid(axis, digits, noise):
    batch = torch.cat([digits, noise])
    for value in T.GRIDS[axis]:
        ours = T.apply_transform(batch, axis, value)
        ref = torch.stack([pil_reference(img, axis, value) for img in batch])
        diff = (ours.int() - ref.int()).abs()
        assert diff.max() == 0, f"{axis}={value}: {(diff > 0).sum()} pixels differ, max {diff.max()}"


def test_rotation_off_grid_and_fast_paths_match_pil(noise):
    for angle in (90, -90, 270, 45, 7.5, -33):
        ref = torch.stack([pil_reference(img, "rotation", angle) for img in noise])
        assert torch.equal(T.apply_transform(noise, "rotation", angle), ref), angle


def test_old_shear_matrix_matches_hand_formula():
    for s in T.GRIDS["shear"]:
        assert np.allclose(T.shear_coefficients(s, 28, 28), old_torchvision_shear(s), atol=1e-9)


def test_scale_boxes_match_protocol_table():
    table = {0.5: 7, 0.6: 5, 0.7: 4, 0.8: 2, 0.9: 1, 1.0: 0, 1.1: -2, 1.2: -3, 1.3: -5,
             1.4: -6, 1.5: -7, 1.6: -9, 1.7: -10, 1.8: -12, 1.9: -13}
    ends = {0.5: 21, 0.6: 22, 0.7: 24, 0.8: 24, 0.9: 26, 1.0: 28, 1.1: 29, 1.2: 31, 1.3: 31,
            1.4: 33, 1.5: 35, 1.6: 36, 1.7: 38, 1.8: 38, 1.9: 40}
    for s, a in table.items():
        assert T.scale_box(s, 28, 28) == (a, a, ends[s], ends[s])
    # the reference's np.arange approximations give the same boxes, hence the same pixels
    for s in np.arange(0.5, 2.0, 0.1):
        assert T.scale_box(float(s), 28, 28) == T.scale_box(round(float(s), 1), 28, 28)


# --------------------------------------------------------------------------- semantics


def test_identities(digits):
    for axis, value in (("rotation", 0), ("scale", 1.0), ("shear", 0)):
        assert torch.equal(T.apply_transform(digits, axis, value), digits)


@pytest.mark.parametrize("value", [-180, 180])
def test_shear_180_is_vertical_flip(digits, value):
    # centre 14.5 (torchvision<=0.4): out[y] = in[28 - y], row 0 falls outside and is filled 0
    out = T.apply_transform(digits, "shear", value)
    assert torch.equal(out[:, 1:], torch.flip(digits, dims=[1])[:, :-1])
    assert out[:, 0].eq(0).all()


def test_rotation_is_counter_clockwise():
    img = torch.zeros(1, 28, 28, dtype=torch.uint8)
    img[0, 2, 14] = 255  # top centre
    out = T.apply_transform(img, "rotation", 90)
    ys, xs = torch.nonzero(out[0], as_tuple=True)
    assert xs.item() < 14 and abs(ys.item() - 14) <= 1  # moved to the left edge


def test_scale_below_one_zooms_in(digits):
    def ink(x):
        return (x > 0).float().mean().item()
    zoomed, shrunk = T.apply_transform(digits, "scale", 0.5), T.apply_transform(digits, "scale", 1.9)
    assert ink(zoomed) > ink(digits) > ink(shrunk)


def test_float_and_shapes_follow_uint8(digits):
    f = digits.float() / 255
    for axis, value in (("rotation", -160), ("shear", 40), ("scale", 0.7), ("scale", 1.7)):
        ref = T.apply_transform(digits, axis, value).float() / 255
        out = T.apply_transform(f, axis, value)
        assert out.dtype == torch.float32 and out.shape == f.shape
        assert (out - ref).abs().max() <= 1.01 / 255  # float path skips PIL's uint8 roundings
        four_d = T.apply_transform(digits.unsqueeze(1), axis, value)
        assert four_d.shape == (8, 1, 28, 28)
        assert torch.equal(four_d[:, 0], T.apply_transform(digits, axis, value))


def test_bad_arguments(digits):
    with pytest.raises(ValueError, match="'zoom'"):
        T.apply_transform(digits, "zoom", 1)
    with pytest.raises(TypeError, match="int64"):
        T.apply_transform(digits.long(), "rotation", 20)
    with pytest.raises(ValueError, match="degenerate"):
        T.apply_transform(digits, "shear", 90)
    with pytest.raises(ValueError, match="> 0"):
        T.apply_transform(digits, "scale", 0)


# --------------------------------------------------------------------------- grids and meta-splits


def test_grids():
    assert T.GRIDS["rotation"] == T.GRIDS["shear"] == tuple(range(-180, 180, 20))
    assert T.GRIDS["scale"] == (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9)
    assert T.canonical_value("scale", np.arange(0.5, 2.0, 0.1)[3]) == 0.8
    assert T.canonical_value("rotation", np.int64(-160)) == -160


COUNTS = {
    "rotation": {"interleaved": (9, 9), "sparse": (5, 13), "contiguous": (10, 8)},
    "shear": {"interleaved": (9, 9), "sparse": (5, 13), "contiguous": (10, 8)},
    "scale": {"interleaved": (8, 7), "sparse": (4, 11), "contiguous": (8, 7)},
}


@pytest.mark.parametrize("axis", T.AXES)
def test_splits_partition_grid(axis):
    for split, (n_seen, n_unseen) in COUNTS[axis].items():
        seen, unseen = T.SPLITS[axis][split]
        assert (len(seen), len(unseen)) == (n_seen, n_unseen)
        assert sorted(seen + unseen) == sorted(T.GRIDS[axis])


def test_split_values_match_protocol():
    seen, unseen = T.SPLITS["rotation"]["interleaved"]
    assert seen == (-180, -140, -100, -60, -20, 20, 60, 100, 140) and 0 in unseen
    assert T.SPLITS["rotation"]["sparse"][0] == (-160, -80, 0, 80, 160)
    assert T.SPLITS["rotation"]["contiguous"] == (tuple(range(-180, 20, 20)), tuple(range(20, 180, 20)))
    assert T.SPLITS["scale"]["interleaved"][0] == (0.5, 0.7, 0.9, 1.1, 1.3, 1.5, 1.7, 1.9)
    assert T.SPLITS["scale"]["sparse"][0] == (0.6, 1.0, 1.4, 1.8)
    assert T.SPLITS["scale"]["contiguous"][1] == (1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9)
    assert T.SPLITS["shear"] == T.SPLITS["rotation"]


def test_split_aliases_and_errors():
    assert T.resolve_split("standard") == "interleaved"
    assert T.resolve_split("Disjoint") == "contiguous"
    assert T.get_split("scale", "standard") == T.SPLITS["scale"]["interleaved"]
    with pytest.raises(ValueError, match="'halves'"):
        T.resolve_split("halves")
    with pytest.raises(ValueError, match="'elevation'"):
        T.get_split("elevation", "sparse")


# --------------------------------------------------------------------------- cache


def test_transform_split_cache(digits, tmp_path, monkeypatch):
    values = np.arange(0.5, 2.0, 0.1)[:3]  # the reference's float approximations -> canonical keys
    first = T.transform_split(digits, "scale", values, cache_dir=tmp_path)
    assert list(first) == [0.5, 0.6, 0.7]
    assert len(list(tmp_path.glob("*.pt"))) == 3 and not list(tmp_path.glob(".*"))

    def boom(*args):
        raise AssertionError("cache miss")
    monkeypatch.setattr(T, "apply_transform", boom)
    second = T.transform_split(digits, "scale", [0.5, 0.6, 0.7], cache_dir=tmp_path)
    assert all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(AssertionError, match="cache miss"):  # other pixels -> other key
        T.transform_split(digits.flip(0), "scale", [0.5], cache_dir=tmp_path)


def test_transform_split_recovers_from_corrupt_cache(digits, tmp_path):
    first = T.transform_split(digits, "rotation", [20], cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.pt")
    path.write_bytes(b"garbage")
    again = T.transform_split(digits, "rotation", [20], cache_dir=tmp_path)
    assert torch.equal(again[20], first[20])


def test_transform_split_without_cache(digits):
    out = T.transform_split(digits, "shear", T.SPLITS["shear"]["sparse"][0])
    assert list(out) == [-160, -80, 0, 80, 160]
    assert torch.equal(out[0], digits)
