"""lowrank/metrics.py (every metric, the exact truncated SVDs, the summary) against an independent
float64 NumPy computation; the synthetic stand-in cache's spectrum."""

import numpy as np
import pytest
import torch

import synth_features
from lowrank import dataset, feature_cache, metrics
from lowrank.cli import UserError


def random_mats(kind, n=3, T=256, D=2048, seed=0):
    g = np.random.default_rng(seed)
    if kind == "random":
        return g.standard_normal((n, T, D))
    # low rank 40 plus noise, with a decaying spectrum like real features
    U = g.standard_normal((n, T, 40)) * (0.8 ** np.arange(40))
    return U @ g.standard_normal((n, 40, D)) + 0.01 * g.standard_normal((n, T, D))


def np_metrics(X, Xh):
    out = {k: [] for k in metrics.METRICS}
    for x, xh in zip(X, Xh):
        e = x - xh
        out["cosine"].append((x * xh).sum() / np.linalg.norm(x) / np.linalg.norm(xh))
        out["token_cosine"].append(
            np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(x, xh)])
        )
        out["mse"].append((e**2).mean())
        rf = np.linalg.norm(e) / np.linalg.norm(x)
        out["rel_fro"].append(rf)
        out["rel_token"].append(np.mean(np.linalg.norm(e, axis=1) / np.linalg.norm(x, axis=1)))
        out["energy"].append(1 - rf**2)
    return {k: np.array(v) for k, v in out.items()}


def np_truncated(x, r):
    U, S, Vt = np.linalg.svd(x, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vt[:r], S


@pytest.mark.parametrize("kind", ["random", "lowrank"])
def test_metrics_match_numpy(kind):
    X = random_mats(kind)
    Xh = X + 0.3 * np.random.default_rng(1).standard_normal(X.shape) * X.std()
    got = metrics.metrics(torch.from_numpy(X).float(), torch.from_numpy(Xh).float())
    ref = np_metrics(X, Xh)
    for k in metrics.METRICS:
        np.testing.assert_allclose(got[k].numpy(), ref[k], rtol=1e-5, err_msg=k)


@pytest.mark.parametrize("method", metrics.METHODS)
@pytest.mark.parametrize("kind", ["random", "lowrank"])
def test_truncated_svd_is_optimal(method, kind):
    X = random_mats(kind)
    r = 32
    A, B, S = metrics.truncated_svd(torch.from_numpy(X).float(), r, method)
    assert A.shape == (3, 256, r) and B.shape == (3, r, 2048) and S.shape == (3, 256)
    Xt = torch.from_numpy(X).float()
    Xh = A @ B
    for k in range(3):
        ref, Sref = np_truncated(X[k].astype(np.float32).astype(np.float64), r)
        np.testing.assert_allclose(S[k].numpy(), Sref, rtol=1e-4, atol=1e-4 * Sref[0])
        np.testing.assert_allclose(Xh[k].numpy(), ref, atol=2e-4 * np.abs(ref).max())
        # Eckart-Young: the error energy is the energy of the dropped singular values
        err2 = ((Xt[k].double() - Xh[k].double()) ** 2).sum().item()
        np.testing.assert_allclose(err2, (Sref[r:] ** 2).sum(), rtol=1e-4)
    m = metrics.metrics(Xt, Xh)
    # for an orthogonal projection the flattened cosine is sqrt(captured energy)
    e = metrics.captured_energy(S)[:, r - 1]
    np.testing.assert_allclose(m["cosine"].numpy(), e.sqrt().numpy(), rtol=1e-5)
    np.testing.assert_allclose(m["energy"].numpy(), e.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", metrics.METHODS)
def test_full_rank_reconstructs(method):
    X = torch.from_numpy(random_mats("random", n=2, T=64, D=300)).float()
    A, B, _ = metrics.truncated_svd(X, 64, method)
    torch.testing.assert_close(A @ B, X, rtol=1e-4, atol=1e-4)
    # B's rows are orthonormal (V_rᵀ)
    torch.testing.assert_close(
        B @ B.transpose(1, 2), torch.eye(64).expand(2, 64, 64), atol=1e-4, rtol=0
    )


def test_gram_agrees_with_linalg_svd():
    X = torch.from_numpy(random_mats("lowrank", seed=5)).float()
    for r in (16, 64, 128):
        a = metrics.svd_reconstruct(X, r, "gram")
        b = metrics.svd_reconstruct(X, r, "svd")
        assert (a - b).norm() / b.norm() < 1e-5


def test_rank_deficient_input_has_no_nan():
    X = torch.from_numpy(random_mats("lowrank", n=2, T=64, D=200)).float()
    X[:, 10:] = 0  # rank <= 10
    A, B, S = metrics.truncated_svd(X, 32, "gram")
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    torch.testing.assert_close(A @ B, X, atol=1e-4, rtol=1e-4)


def test_summarize():
    s = metrics.summarize({"cosine": [0.9, 0.8, 1.0]})
    assert s["cosine"]["n"] == 3 and abs(s["cosine"]["mean"] - 0.9) < 1e-12
    assert abs(s["cosine"]["std"] - np.std([0.9, 0.8, 1.0], ddof=1)) < 1e-12


def test_hard_synthetic_cache_matches_the_real_spectrum(tmp_path):
    """synth_features.py: a normal cache, reproducible, whose rank-128 SVD cosine is the real
    model's 0.99 ± 0.005."""
    synth_features.main(["--out", str(tmp_path / "hard"), "--num", "12", "--groups", "4"])
    ds = dataset.FeatureDataset(tmp_path / "hard")
    assert len(ds) == 12 and feature_cache.cached_shape(tmp_path / "hard") == (256, 2048)
    X = torch.stack([x for x, _ in ds])
    cos = metrics.metrics(X, metrics.svd_reconstruct(X, 128))["cosine"]
    assert abs(cos.mean().item() - 0.99) < 0.005 and cos.std().item() < 0.006
    again = next(synth_features.generate(1))[1]
    assert torch.equal(torch.load(tmp_path / "hard" / "features_0.pt", weights_only=True), again)
    with pytest.raises(UserError, match="not empty"):
        synth_features.main(["--out", str(tmp_path / "hard"), "--num", "2"])
