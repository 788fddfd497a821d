"""Metric definitions checked against scikit-image, pytorch-fid and references written here."""
import warnings
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch
from pytorch_fid.fid_score import calculate_frechet_distance
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from evaluation.metrics import (GaussianStatistics, average_precision, binary_auc, class_log_odds, classification_metrics,
                                frechet_distance, frechet_distance_from_features, frechet_distance_of, psnr,
                                quantize_to_uint8, quantize_to_unit, ssim)


@pytest.fixture(scope="module")
def image_pair():
    """A real photograph (skimage's astronaut) and a degraded copy, [1, 3, 96, 96] in [0, 1] on the uint8 grid."""
    from skimage import data, transform

    reference = transform.resize(data.astronaut(), (96, 96), anti_aliasing=True)          # [H, W, 3] in [0, 1]
    rng = np.random.default_rng(0)
    degraded = np.clip(gaussian_filter(reference, (1.2, 1.2, 0)) + rng.normal(0, 0.03, reference.shape), 0, 1)
    to_tensor = lambda a: torch.from_numpy(np.round(a * 255) / 255).permute(2, 0, 1)[None].float()
    return to_tensor(reference), to_tensor(degraded)


def test_quantisation_is_the_uint8_grid_of_the_data_pipeline():
    from meditok.data.slicing import signed_to_uint8

    x = torch.linspace(-1.2, 1.2, 1001)
    assert torch.equal(quantize_to_uint8(x), torch.from_numpy(signed_to_uint8(x.numpy())))
    unit = quantize_to_unit(x)
    assert unit.min() == 0 and unit.max() == 1
    assert torch.allclose(unit * 255, (unit * 255).round(), atol=1e-4)


def test_psnr_equals_scikit_image(image_pair):
    reference, degraded = image_pair
    ours = psnr(reference, degraded)
    theirs = peak_signal_noise_ratio(reference[0].numpy().astype(np.float64), degraded[0].numpy().astype(np.float64),
                                     data_range=1.0)
    assert ours.shape == (1,)
    assert ours.item() == pytest.approx(theirs, abs=1e-6)
    assert 15 < ours.item() < 40


def test_psnr_is_per_image():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 16, 16, generator=g), torch.rand(3, 3, 16, 16, generator=g)
    for i, value in enumerate(psnr(a, b)):
        assert value.item() == pytest.approx(peak_signal_noise_ratio(a[i].double().numpy(), b[i].double().numpy(),
                                                                     data_range=1.0), abs=1e-9)
    assert torch.isinf(psnr(a, a)).all()


def test_ssim_equals_scikit_image_on_channel_last_images(image_pair):
    reference, degraded = image_pair
    hwc = lambda t: t[0].permute(1, 2, 0).double().numpy()
    theirs = structural_similarity(hwc(reference), hwc(degraded), channel_axis=-1, data_range=1.0,
                                   gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ssim(reference, degraded).item() == pytest.approx(theirs, abs=1e-9)
    # The LlamaGen bug (data_range=2 on [0, 1] images) gives a visibly higher number: ours is not that.
    inflated = structural_similarity(hwc(reference), hwc(degraded), channel_axis=-1, data_range=2.0,
                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert inflated - ssim(reference, degraded).item() > 0.01


def test_ssim_matches_wang_et_al_written_out(image_pair):
    """Independent reference: Gaussian-weighted SSIM map (σ 1.5, truncate 3.5 → 11×11), population moments,
    K1 0.01, K2 0.03, L 1, averaged away from the 5-pixel border."""
    reference, degraded = image_pair
    x, y = reference[0, 1].double().numpy(), degraded[0, 1].double().numpy()
    blur = lambda a: gaussian_filter(a, 1.5, truncate=3.5)
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2, blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    expected = ssim_map[5:-5, 5:-5].mean()
    ours = ssim(reference[:, 1], degraded[:, 1]).item()   # grayscale [B, H, W]
    assert ours == pytest.approx(expected, abs=1e-6)
    assert ssim(reference, reference).item() == pytest.approx(1.0)


def test_gaussian_statistics_stream_equals_numpy():
    rng = np.random.default_rng(1)
    features = rng.normal(5.0, 2.0, size=(300, 16)) + rng.normal(size=16) * 100  # large offset: cancellation trap
    stats = GaussianStatistics(16)
    for chunk in np.array_split(features, 7):
        stats.update(torch.from_numpy(chunk))
    np.testing.assert_allclose(stats.mean, features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-9)
    assert stats.features is None  # more vectors than dimensions: no longer kept


def _pytorch_fid_frechet_distance(*args):
    """pytorch-fid's own function. pytorch-fid 0.3.0 calls scipy.linalg.sqrtm(..., disp=False), a keyword
    SciPy 1.18 removed; there, adapt only the call (same sqrtm, old return shape), not the computation."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The `disp` argument is deprecated", category=DeprecationWarning)
        try:
            return calculate_frechet_distance(*args)
        except TypeError as error:
            if "disp" not in str(error):
                raise
    sqrtm = scipy.linalg.sqrtm
    with mock.patch.object(scipy.linalg, "sqrtm", lambda matrix, disp=True, **kwargs: (sqrtm(matrix, **kwargs), 0.0)):
        return calculate_frechet_distance(*args)


def test_frechet_distance_equals_pytorch_fid():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32))
    b = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32)) * 0.7 + 0.3
    args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(*args) == pytest.approx(_pytorch_fid_frechet_distance(*args), rel=1e-8)


def test_frechet_distance_closed_form_for_known_gaussians():
    rng = np.random.default_rng(3)
    dim = 6
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    eigen1, eigen2 = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    sigma1, sigma2 = rotation @ np.diag(eigen1) @ rotation.T, rotation @ np.diag(eigen2) @ rotation.T
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    # Commuting covariances: (Σ1Σ2)^½ = R diag(√(λ1λ2)) Rᵀ, so FD = ‖Δμ‖² + Σ (√λ1 − √λ2)².
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(eigen1) - np.sqrt(eigen2)) ** 2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-10)
    # Same Gaussians: zero. One dimension: (μ1 − μ2)² + (σ1 − σ2)².
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # Estimated from samples of those Gaussians, the distance approaches the closed form.
    x1 = rng.multivariate_normal(mu1, sigma1, size=40000)
    x2 = rng.multivariate_normal(mu2, sigma2, size=40000)
    s1, s2 = GaussianStatistics(dim), GaussianStatistics(dim)
    s1.update(x1)
    s2.update(x2)
    assert frechet_distance_of(s1, s2) == pytest.approx(expected, rel=0.03)


def test_small_set_formula_is_exact():
    """Fewer vectors than dimensions (a small modality): the low-rank route equals the covariance route."""
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(9, 64)), rng.normal(size=(7, 64)) * 1.5 + 0.2
    s1, s2 = GaussianStatistics(64), GaussianStatistics(64)
    s1.update(a[:4])
    s1.update(a[4:])
    s2.update(b)
    np.testing.assert_allclose(s1.features, a)
    covariance_route = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance_from_features(a, b) == pytest.approx(covariance_route, rel=1e-7)
    assert frechet_distance_of(s1, s2) == pytest.approx(covariance_route, rel=1e-7)


def _auc_by_pairs(labels, scores):
    positives, negatives = scores[labels == 1], scores[labels == 0]
    wins = (positives[:, None] > negatives[None, :]).sum() + 0.5 * (positives[:, None] == negatives[None, :]).sum()
    return wins / (len(positives) * len(negatives))


def _ap_by_thresholds(labels, scores):
    total, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores), reverse=True):
        predicted = scores >= threshold
        true_positives = (predicted & (labels == 1)).sum()
        recall = true_positives / (labels == 1).sum()
        total += (recall - previous_recall) * true_positives / predicted.sum()
        previous_recall = recall
    return total


@pytest.mark.parametrize("ties", [False, True])
def test_auc_and_average_precision_match_their_definitions(ties):
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 200)
    scores = labels * 0.8 + rng.normal(size=200)
    if ties:
        scores = np.round(scores, 1)
    assert binary_auc(labels, scores) == pytest.approx(_auc_by_pairs(labels, scores), abs=1e-12)
    assert average_precision(labels, scores) == pytest.approx(_ap_by_thresholds(labels, scores), abs=1e-12)
    assert np.isnan(binary_auc(np.ones(5), np.arange(5.0)))
    assert average_precision(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8])) == 1.0


def test_against_scikit_learn_when_installed():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 2, 300)
    scores = np.round(labels * 0.5 + rng.normal(size=300), 1)
    assert binary_auc(labels, scores) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores))
    assert average_precision(labels, scores) == pytest.approx(sklearn_metrics.average_precision_score(labels, scores))


def test_classification_metrics_conventions():
    rng = np.random.default_rng(7)
    # Binary task as 2-class softmax: the macro one-vs-rest AUC is the plain AUC of the positive class.
    labels = rng.integers(0, 2, 100)
    margin = labels + rng.normal(size=100)                         # z1 - z0
    p1 = 1 / (1 + np.exp(-margin))
    log_odds = class_log_odds(np.stack([np.zeros(100), margin], axis=1), "multi-class")
    np.testing.assert_allclose(log_odds, np.stack([-margin, margin], axis=1), atol=1e-12)
    result = classification_metrics("multi-class", labels, log_odds)
    assert result["auc"] == pytest.approx(100 * binary_auc(labels, p1))
    assert result["map"] == pytest.approx(100 * average_precision(labels, p1))
    assert result["map_two_class"] == pytest.approx(50 * (average_precision(labels, p1) + average_precision(1 - labels, 1 - p1)))
    assert result["acc"] == pytest.approx(100 * np.mean((p1 >= 0.5) == labels))
    # Multi-label: mean over labels; a label without positives in the test set is left out of the AUC.
    multi = rng.integers(0, 2, (80, 3))
    multi[:, 2] = 0
    probabilities = np.clip(multi * 0.6 + rng.uniform(0.01, 0.4, (80, 3)), 0.01, 0.99)
    logits = np.log(probabilities / (1 - probabilities))
    result = classification_metrics("multi-label", multi, class_log_odds(logits, "multi-label"))
    expected_auc = np.mean([binary_auc(multi[:, c], probabilities[:, c]) for c in range(2)])
    assert result["auc"] == pytest.approx(100 * expected_auc)
    assert result["acc"] == pytest.approx(100 * np.mean((probabilities >= 0.5) == multi))
    assert result["classes_scored"] == 2 and np.isnan(result["map_two_class"])


def test_one_vs_rest_log_odds_are_the_log_odds_of_the_softmax():
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(50, 4)) * 3
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(class_log_odds(torch.tensor(logits), "multi-class"),
                               np.log(probabilities / (1 - probabilities)), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="task"):
        class_log_odds(logits, "regression")


def test_confident_predictions_keep_their_ranks():
    """Logit margins past float32 softmax saturation: probabilities tie at 1.0, log-odds do not."""
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    labels = np.array([0, 0, 1, 1])
    margins = np.array([20.0, 25.0, 30.0, 40.0])          # z1 - z0: every positive above every negative
    logits = np.stack([np.zeros(4), margins], axis=1)
    expected_auc = 100 * sklearn_metrics.roc_auc_score(labels, margins)
    assert expected_auc == 100.0
    saturated = torch.tensor(logits, dtype=torch.float32).softmax(dim=1).double().numpy()
    assert (saturated[:, 1] == 1.0).all()                 # the float32 probabilities of old: 75 % AUC
    assert classification_metrics("multi-class", labels, saturated)["auc"] == pytest.approx(75.0)
    result = classification_metrics("multi-class", labels, class_log_odds(logits, "multi-class"))
    assert result["auc"] == pytest.approx(expected_auc)
    assert result["map"] == pytest.approx(100 * sklearn_metrics.average_precision_score(labels, margins))
    # Three classes, margins where float32 saturates and float64 probabilities still resolve: one-vs-rest macro
    # AUC against scikit-learn on float64 softmax probabilities computed here.
    rng = np.random.default_rng(9)
    labels = np.repeat(np.arange(3), 20)
    logits = np.eye(3)[labels] * rng.uniform(18, 30, (60, 1)) + rng.normal(0, 3, (60, 3))
    shifted = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    reference = 100 * sklearn_metrics.roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")
    assert classification_metrics("multi-class", labels, class_log_odds(logits, "multi-class"))["auc"] == \
        pytest.approx(reference, abs=1e-9)


@pytest.mark.parametrize("ties", [False, True])
def test_binary_map_is_the_positive_class_ap_with_the_two_class_mean_beside_it(ties):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(10)
    labels = rng.integers(0, 2, 300)
    margin = labels * 0.7 + rng.normal(size=300)
    if ties:
        margin = np.round(margin, 1)
    result = classification_metrics("multi-class", labels, class_log_odds(np.stack([-margin / 2, margin / 2], axis=1),
                                                                         "multi-class"))
    positive = sklearn_metrics.average_precision_score(labels, margin)
    negative = sklearn_metrics.average_precision_score(1 - labels, -margin)
    assert result["map"] == pytest.approx(100 * positive)
    assert result["map_two_class"] == pytest.approx(50 * (positive + negative))
    assert result["auc"] == pytest.approx(100 * sklearn_metrics.roc_auc_score(labels, margin))
