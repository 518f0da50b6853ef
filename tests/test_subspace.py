"""The subspace factoriser's orthonormalisation (Cholesky-QR2 with a Householder safeguard) against
torch.linalg.qr, and its nested ranks on the hard synthetic features."""

import pytest
import torch

import synth_features
from lowrank import feature_cache, metrics, model


def prefix_error(Q, Qref, ks):
    """Largest entry of Q_k Q_kᵀ - Qref_k Qref_kᵀ over the prefixes k: 0 when every prefix spans the
    same space."""
    Q, Qref = Q.double(), Qref.double()
    return max(
        (
            Q[..., :k] @ Q[..., :k].transpose(-1, -2)
            - Qref[..., :k] @ Qref[..., :k].transpose(-1, -2)
        )
        .abs()
        .max()
        .item()
        for k in ks
    )


def prefix_projectors_close(Q, Qref, ks, atol=1e-5):
    assert prefix_error(Q, Qref, ks) < atol


def assert_orthonormal(Q, atol=1e-5):
    k = Q.shape[-1]
    assert torch.isfinite(Q).all()
    assert (Q.transpose(-1, -2) @ Q - torch.eye(k)).abs().max() < atol


def conditioned(cond, B=4, T=256, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(B, T, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(B, k, k, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), k, dtype=torch.float64)
    return ((U * s) @ V.transpose(1, 2)).float()


@pytest.mark.parametrize("cond", [1, 1e2, 1e4])
def test_orth_equals_householder_qr(cond):
    """Same span for every prefix (column order kept), orthonormal to 1e-5, on well- and
    ill-conditioned input. The truth is Householder QR in float64; float32 Householder's own error
    is the allowance where it exceeds 1e-5 (at κ = 1e4 it is 4e-5, ours 1.2e-5: the float64 Gram
    matrix makes Cholesky-QR2 the more accurate here)."""
    Y = conditioned(cond)
    Q = model._orth(Y)
    assert_orthonormal(Q)
    ks = (1, 8, 16, 32, 63, 64)
    truth = torch.linalg.qr(Y.double())[0]
    assert prefix_error(Q, truth, ks) <= max(1e-5, prefix_error(torch.linalg.qr(Y)[0], truth, ks))
    prefix_projectors_close(Q, torch.linalg.qr(Y)[0], ks, atol=1e-4)
    # Y lies in span(Q)
    torch.testing.assert_close(Q @ (Q.transpose(1, 2) @ Y), Y, atol=1e-5, rtol=1e-4)


def rank_deficient_cases():
    g = torch.Generator().manual_seed(1)
    Y1 = torch.randn(3, 256, 64, generator=g)
    Y1[:, :, 20:] = 0  # zero columns: rank 20
    Y2 = torch.randn(3, 256, 64, generator=g)
    Y2[:, :, 10] = 2 * Y2[:, :, 3]  # a repeated direction: rank 63
    # rank 8, every column mixed
    Y3 = torch.randn(3, 256, 8, generator=g) @ torch.randn(3, 8, 64, generator=g)
    Y4 = conditioned(1e8, B=3)  # beyond float32: numerically rank-deficient
    return [
        ("zero columns", Y1, 20),
        ("repeated column", Y2, 10),
        ("rank 8", Y3, 8),
        ("cond 1e8", Y4, 16),
    ]


@pytest.mark.parametrize(
    "name,Y,rank", rank_deficient_cases(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_orth_on_rank_deficient_input(name, Y, rank):
    """Rank-deficient and ill-conditioned Y: still orthonormal and finite, the well-defined prefixes
    (up to the rank) span what Householder QR's do, Y is reproduced, and gradients stay finite
    (training goes through _orth)."""
    Y = Y.clone().requires_grad_(True)
    Q = model._orth(Y)
    assert_orthonormal(Q.detach())
    prefix_projectors_close(
        Q.detach(), torch.linalg.qr(Y.detach())[0], ks=range(1, rank + 1), atol=1e-4
    )
    torch.testing.assert_close(Q @ (Q.transpose(1, 2) @ Y), Y, atol=1e-4, rtol=1e-3)
    (Q[..., :rank] @ Q[..., :rank].transpose(1, 2) @ Y).pow(2).sum().backward()
    assert torch.isfinite(Y.grad).all()


def test_orth_mixed_batch_only_redoes_the_bad_samples():
    """One rank-deficient sample in a batch does not change the others' result."""
    Y = conditioned(1e2, B=3)
    bad = Y.clone()
    bad[1, :, 5:] = 0
    Q_alone, Q_mixed = model._orth(Y), model._orth(bad)
    torch.testing.assert_close(Q_mixed[[0, 2]], Q_alone[[0, 2]])
    assert_orthonormal(Q_mixed)


def test_bf16_input_gives_float32_basis():
    Q = model._orth(conditioned(10, B=2).bfloat16())
    assert Q.dtype == torch.float32
    assert_orthonormal(Q)


@pytest.fixture(scope="module")
def hard():
    """100 hard synthetic images ([256, 2048], real-model difficulty), layer-normed: 90 to fit Ω, 10
    to evaluate."""
    X = feature_cache.normalize(torch.stack([x for _, x in synth_features.generate(100, seed=7)]))
    return X[:90], X[90:]


def test_every_rank_from_one_model_on_the_hard_benchmark(hard):
    """One model serves every rank with its schedule's setting (default: 8 extra columns and one
    power step up to rank 64, two power steps above). Above 64 the rank-k factors are the first k
    components of the rank-128 ones, the projection onto range((X Xᵀ)² X Ω[:, :k]); at and below 64
    they are the best rank-k approximation inside range(X Xᵀ X Ω[:, :k + 8]). Both checked against
    an independent float64 computation (Householder QR, SVD)."""
    fit, X = hard
    m = model.build_model({"arch": "subspace", "rank": 128, "tokens": 256, "dim": 2048})
    assert (
        m.setting(16) == (8, 1)
        and m.setting(64) == (8, 1)
        and m.setting(65) == (0, 2)
        and m.power_iters == 2
    )
    assert m.omega.shape == (2048, 128)  # 64 + 8 columns at most below 65, 128 above
    m.init_from_data(fit.split(30))
    X64, om = X.double(), m.omega.detach().double()
    G = X64 @ X64.transpose(1, 2)

    # per image, relative Frobenius distance: float32 rounding at κ(Y) ~ 2e3 (one CholQR pass)
    def close(got, ref):
        assert ((got.double() - ref).norm(dim=(1, 2)) / ref.norm(dim=(1, 2))).max() < 5e-4

    with torch.no_grad():
        A, B = m.factors(X)
        for k in (80, 100):
            Ak, Bk = m.factors(X, k)
            close(Ak @ Bk, (A[..., :k] @ B[:, :k]).double())
            Qref = torch.linalg.qr(G @ G @ X64 @ om[:, :k])[0]
            close(Ak @ Bk, Qref @ (Qref.transpose(1, 2) @ X64))
        for k in (16, 32, 64):
            Ak, Bk = m.factors(X, k)
            Qref = torch.linalg.qr(G @ X64 @ om[:, : k + 8])[0]
            U, S, Vh = torch.linalg.svd(Qref.transpose(1, 2) @ X64, full_matrices=False)
            best = (Qref @ U[..., :k] * S[:, None, :k]) @ Vh[:, :k]
            close(Ak @ Bk, best)


def test_power_step_closes_most_of_the_gap_on_hard_features(hard):
    """On the hard features the power step (the default) is far closer to truncated SVD than Ω alone
    at every rank, and never above it (SVD is optimal)."""
    fit, X = hard
    gaps = {}
    for p in (0, 1):
        m = model.Subspace(rank=128, tokens=256, dim=2048, power_iters=p)
        m.init_from_data(fit.split(30))
        with torch.no_grad():
            for k in (16, 32, 64, 128):
                gap = (
                    metrics.metrics(X, m(X, k)[0])["cosine"]
                    - metrics.metrics(X, metrics.svd_reconstruct(X, k))["cosine"]
                )
                assert (gap <= 1e-6).all()
                gaps[p, k] = gap.mean().item()
    for k in (16, 32, 64, 128):
        assert gaps[1, k] > gaps[0, k] + 0.5 * abs(gaps[0, k]), (k, gaps)  # at least halves the gap
    assert gaps[1, 128] > -0.005, gaps


def test_bench_gpu_sh_dry_run_on_cpu(tmp_path):
    """bench_gpu.sh's plumbing, run on CPU with small sizes: hard cache -> one bf16-autocast epoch
    -> bench.py (with its profile) -> extraction speed -> full-model VQA timing -> one table. The
    exact yardstick is within 1e-5 of float64 SVD, the factoriser never beats SVD, and the table
    names what it ran on."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ,
        DEVICE="cpu",
        NUM="12",
        RANKS="16",
        BATCH="4",
        VQA_LIMIT="2",
        EXTRACT_MODEL="tiny-random",
        EXTRACT_BATCHES="2,4",
        VQA_BATCHES="1,2",
        VQA_BENCH_NUM="2",
        DEMO_NUM="8",
        NEW_TOKENS="2",
        PYTHON=sys.executable,
    )
    r = subprocess.run(
        [str(root / "bench_gpu.sh"), str(tmp_path / "w")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    table = r.stdout[r.stdout.index("== bench_gpu.sh on CPU (a dry run") :]
    assert "features synthetic-hard" in table and "subspace (NN)" in table and "GEMM floor" in table
    assert "train, 1 epoch bf16 amp" in table and "extraction img/s, batch 4" in table
    assert (
        "tiny-random VQA ms/sample: original" in table
        and "tiny-random VQA ms/sample: svd:64" in table
    )
    assert "tiny-random answers/s, batch 2" in table and "same answers: True" in table
    assert "profile: subspace factors at rank 16" in r.stdout and "aten::" in r.stdout
    b = json.loads((tmp_path / "w" / "results" / "bench.json").read_text())
    assert (
        b["features"] == "synthetic-hard"
        and b["arch_options"]["schedule"] == model.DEFAULT_SCHEDULE
    )
    rows = {row["method"]: row for row in b["rows"]}
    fastest = rows["subspace (NN)"]["fastest_exact"]
    assert rows[fastest]["max_rel_dev_vs_fp64_svd"] <= 1e-5
    assert rows["subspace (NN)"]["gap"] <= 1e-6 and rows["subspace (NN)"]["x_gemm_floor"] > 1
    e = json.loads((tmp_path / "w" / "extract.json").read_text())
    assert [row["batch"] for row in e["rows"]] == [2, 4] and all(
        row["both_img_s"] > 0 for row in e["rows"]
    )
    v = json.loads((tmp_path / "w" / "results_vqa" / "vqa_train.json").read_text())
    assert [s["condition"] for s in v["summary"]] == [
        "original",
        "zeros",
        "svd:64",
        "nn:64",
        "keep:leverage:64",
    ]
