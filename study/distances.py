"""Distances in the features of our chest X-ray classifier (classify.py, trained on real images):
features that see X-ray anatomy rather than ImageNet objects, and need no ImageNet weights. The same
formulas as FID and KID (fid.py), on another scale: NOT comparable with FID.
"""

from __future__ import annotations

import numpy as np
import torch

import classify
import data
from fid import frechet_distance, kid, mean_and_covariance, prdc
from plumbing.configs import CLIError


def feature_distance(f_real: np.ndarray, f_fake: np.ndarray, pr_k: int | None = None) -> dict:
    """Frechet distance and KID on any features (N, D), and with pr_k precision, recall, density and
    coverage (prdc). The same formulas as FID and KID, so the same caveats about sample counts; the
    values live on another scale."""
    if min(len(f_real), len(f_fake)) < 2:
        raise CLIError(f"need at least 2 images per side (got {len(f_real)} and {len(f_fake)})")
    mu1, s1 = mean_and_covariance(np.asarray(f_real, np.float64))
    mu2, s2 = mean_and_covariance(np.asarray(f_fake, np.float64))
    k_mean, k_std, m = kid(f_real, f_fake)
    out = dict(cxr_fd=frechet_distance(mu1, s1, mu2, s2), cxr_kid_mean=k_mean, cxr_kid_std=k_std,
               cxr_kid_subset_size=m, cxr_n_real=len(f_real), cxr_n_fake=len(f_fake), cxr_dim=int(f_real.shape[1]))
    return out | ({f"cxr_{k}": v for k, v in prdc(f_real, f_fake, pr_k).items()} if pr_k else {})


def classifier_features(classifier_path, size: int | None = None):
    """(features_fn, size): the penultimate features of a saved classifier (classify.load_classifier, which
    refuses a damaged checkpoint in one line) on uint8 (N, S, S) images, at its size unless `size`."""
    model, config = classify.load_classifier(classifier_path)
    size = size or config["size"]
    return (lambda u8: classify.embed(model, u8, size)), size


def classifier_feature_distance(real, fake, classifier_path, *, features_fn=None, size: int | None = None,
                                progress: bool = True, pr_k: int | None = None) -> dict:
    """Frechet distance and KID on the penultimate features of our chest X-ray
    classifier (classify.py, trained on real data): features that see X-ray anatomy
    rather than ImageNet objects, and no ImageNet weights needed. NOT comparable with FID.

    real/fake: folders or uint8 tensors (N, S, S). features_fn(uint8 (N, S, S)) -> (N, D)
    replaces loading the classifier (classifier_features makes one); then `size` must be given."""
    if features_fn is None:
        features_fn, size = classifier_features(classifier_path, size)

    def u8(source):
        if torch.is_tensor(source):
            return source
        return data.load_folder(source, size, progress=progress).images  # (N, S, S), centre-cropped

    return feature_distance(np.asarray(features_fn(u8(real)), np.float64),
                            np.asarray(features_fn(u8(fake)), np.float64), pr_k)
