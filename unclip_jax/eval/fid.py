"""Fréchet Inception Distance as pytorch-fid computes it, plus a cacheable statistics file.

  features [N, D] (float64)  ->  mu = mean(features, 0) [D],  sigma = np.cov(features, rowvar=False) [D, D]
  FID = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 @ sigma2))

`frechet_distance(method="sqrtm")` follows pytorch-fid's `calculate_frechet_distance`: scipy.linalg.sqrtm of the
product; if that is not finite, retry with eps * I added to both covariances; drop an imaginary part when its
diagonal is below 1e-3, else fail. `method="eigh"` computes the same trace as the sum of square roots of the
eigenvalues of sqrt(sigma1) sigma2 sqrt(sigma1) (symmetric PSD, so eigenvalues are real and clipped at 0): no
complex arithmetic and robust for the singular covariances of small samples; the two agree to ~1e-6 relative on
well-conditioned statistics (tested).

`FIDStats` holds mu, sigma, n, the protocol and the feature name (and the weights' fingerprint); `.npz` files
written by `save` are refused by `check_compatible` when any of those differ from the run's.
"""
from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np

STATS_FORMAT = "unclip_jax.fid_stats.v1"
MIN_UNBIASED_SAMPLES = 2048


class StatsMismatchError(ValueError):
  """A cached statistics file was computed under another protocol, feature extractor or weights."""


@dataclasses.dataclass
class FIDStats:
  """Gaussian statistics of features: mu [D], sigma [D, D] (float64), n samples, and how they were computed."""
  mu: np.ndarray
  sigma: np.ndarray
  n: int
  protocol: str | None
  features: str | None
  fingerprint: str | None = None

  @classmethod
  def from_features(cls, features: np.ndarray, protocol: str | None, feature_name: str | None,
                    fingerprint: str | None = None, what: str = "images") -> "FIDStats":
    mu, sigma = feature_statistics(features, what=what)
    return cls(mu=mu, sigma=sigma, n=int(features.shape[0]), protocol=protocol, features=feature_name,
               fingerprint=fingerprint)

  def save(self, path: str | os.PathLike) -> None:
    path = os.fspath(path)
    if os.path.dirname(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a path lacking it
      np.savez(f, mu=self.mu, sigma=self.sigma, n=np.int64(self.n), protocol=np.str_(self.protocol or ""),
               features=np.str_(self.features or ""), fingerprint=np.str_(self.fingerprint or ""),
               format=np.str_(STATS_FORMAT))

  @classmethod
  def load(cls, path: str | os.PathLike) -> "FIDStats":
    """Read our `.npz` (or pytorch-fid's mu/sigma-only one, whose protocol/features are then None)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"statistics file not found: {path}")
    try:
      with np.load(path, allow_pickle=False) as z:
        if "mu" not in z or "sigma" not in z:
          raise ValueError(f"{path} has no 'mu' / 'sigma' arrays (keys: {', '.join(z.files)})")
        get = lambda k: (str(z[k]) or None) if k in z else None  # noqa: E731
        mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
        n = int(z["n"]) if "n" in z else -1
        stats = cls(mu=mu, sigma=sigma, n=n, protocol=get("protocol"), features=get("features"),
                    fingerprint=get("fingerprint"))
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot read statistics file {path}: {e}") from e
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
      raise ValueError(f"{path}: mu {mu.shape} / sigma {sigma.shape} are not [D] / [D, D]")
    return stats

  def check_compatible(self, protocol: str, features: str, fingerprint: str | None = None,
                       source: str = "statistics") -> None:
    """Refuse statistics computed under a different protocol / feature extractor / weights."""
    if self.protocol is None or self.features is None:
      raise StatsMismatchError(
          f"{source} carries no protocol/feature metadata (a plain mu/sigma file?); recompute it with "
          "`python -m unclip_jax.eval fid ... --save-real-stats`, or label it with --stats-protocol if you know "
          "which protocol and Inception weights produced it")
    if self.protocol != protocol:
      raise StatsMismatchError(f"{source} was computed with protocol {self.protocol!r}, this run uses "
                               f"{protocol!r}; FIDs under different resize protocols are not comparable")
    if self.features != features:
      raise StatsMismatchError(f"{source} holds {self.features!r} features, this run uses {features!r}")
    if self.fingerprint and fingerprint and self.fingerprint != fingerprint:
      raise StatsMismatchError(f"{source} was computed with other weights (fingerprint {self.fingerprint}, "
                               f"this run {fingerprint})")


def feature_statistics(features: np.ndarray, what: str = "images") -> tuple[np.ndarray, np.ndarray]:
  """[N, D] -> (mu [D], sigma [D, D]) in float64, as pytorch-fid (np.mean, np.cov with N - 1)."""
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2:
    raise ValueError(f"features must be [N, D], got {features.shape}")
  n = features.shape[0]
  if n < 2:
    raise ValueError(f"FID needs at least 2 {what} (a covariance), got {n}")
  if n < MIN_UNBIASED_SAMPLES:
    warnings.warn(f"only {n} {what}: FID is strongly biased below {MIN_UNBIASED_SAMPLES} samples (and the "
                  f"covariance is singular below {features.shape[1] + 1}); numbers are not comparable to "
                  "published ones (those use 10k-50k)", stacklevel=2)
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
  from scipy import linalg

  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonals", stacklevel=3)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"FID: sqrtm has an imaginary component {np.max(np.abs(covmean.imag)):.3g} "
                       "(too few samples for the feature width? try --fd-method eigh)")
    covmean = covmean.real
  return float(np.trace(covmean))


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  from scipy import linalg

  w, v = linalg.eigh(sigma1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  m = root1 @ sigma2 @ root1
  ev = linalg.eigvalsh((m + m.T) / 2)
  return float(np.sqrt(np.clip(ev, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, method: str = "sqrtm") -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); mu [D], sigma [D, D]; float64."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f"mean vectors differ in length: {mu1.shape} vs {mu2.shape}")
  if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
    raise ValueError(f"covariances {sigma1.shape} / {sigma2.shape} do not match means {mu1.shape}")
  if method == "sqrtm":
    tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
  elif method == "eigh":
    tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
  else:
    raise ValueError(f"unknown Fréchet distance method {method!r}; use 'sqrtm' or 'eigh'")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_stats(a: FIDStats, b: FIDStats, method: str = "sqrtm") -> float:
  return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, method=method)
