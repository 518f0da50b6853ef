"""tokens.py and the answer-box metrics: every rule against an independent NumPy computation, exact
bases of low-rank matrices, the box -> token mapping on hand-made boxes, recall/precision by hand,
and the script end to end."""

import csv
import json
import re

import numpy as np
import pytest
import scipy.linalg
import torch

import compare_svd_nn
import tokens
from lowrank import dataset, feature_cache, merging, metrics, selection
from lowrank.cli import UserError


def small(T=24, D=40, seed=0):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_rules_against_numpy():
    X = small()
    x = X.numpy()
    k = 6
    U = np.linalg.svd(x, full_matrices=False)[0][:, :k]
    assert set(selection.select("leverage", X, k).tolist()) == set(np.argsort(-(U**2).sum(1))[:k])
    assert set(selection.select("norm", X, k).tolist()) == set(
        np.argsort(-np.linalg.norm(x, axis=1))[:k]
    )
    basis = torch.linalg.qr(torch.randn(40, 5, dtype=torch.float64))[0]
    b = basis.numpy()
    resid = np.linalg.norm(x - x @ b @ b.T, axis=1)
    assert set(selection.select("lrcp", X, k, basis=basis).tolist()) == set(np.argsort(-resid)[:k])
    # LAPACK geqp3 on Xᵀ: tokens are columns
    piv = scipy.linalg.qr(x.T, pivoting=True, mode="economic")[2]
    assert selection.select("pivoted_qr", X, k).tolist() == piv[:k].tolist()
    r1 = selection.select("random", X, k, generator=torch.Generator().manual_seed(3))
    r2 = selection.select("random", X, k, generator=torch.Generator().manual_seed(3))
    assert torch.equal(r1, r2) and len(set(r1.tolist())) == k and max(r1) < 24


def test_grid_rule_by_hand():
    assert selection.grid_tokens((16, 16), 16).tolist() == sorted(
        r * 16 + c for r in (2, 6, 10, 14) for c in (2, 6, 10, 14)
    )
    for hw, k in (((16, 16), 32), ((16, 16), 128), ((32, 16), 64), ((14, 14), 16)):
        t = selection.grid_tokens(hw, k)
        assert len(t) == k and len(set(t.tolist())) == k and t.max() < hw[0] * hw[1]


@pytest.mark.parametrize("rule", ["leverage", "pivoted_qr"])
def test_exact_basis_of_a_rank_k_matrix(rule):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(30, 8, generator=g, dtype=torch.float64) @ torch.randn(
        8, 50, generator=g, dtype=torch.float64
    )
    kept = selection.select(rule, X, 8)
    torch.testing.assert_close(selection.reconstruct_from(X, kept), X, atol=1e-9, rtol=1e-9)
    m = metrics.metrics(X[None], selection.reconstruct_from(X, kept)[None])
    assert m["cosine"].item() == pytest.approx(1.0, abs=1e-12)


def test_reconstruction_is_the_projection_onto_the_kept_span():
    X = small()
    kept = torch.tensor([0, 3, 7])
    x = X.numpy()
    ref = x @ np.linalg.pinv(x[[0, 3, 7]]) @ x[[0, 3, 7]]
    np.testing.assert_allclose(selection.reconstruct_from(X, kept).numpy(), ref, atol=1e-10)
    # no k-token selection beats rank-k truncated SVD
    assert (
        metrics.metrics(X[None], torch.from_numpy(ref)[None])["cosine"]
        <= metrics.metrics(X[None], metrics.svd_reconstruct(X[None], 3, "svd"))["cosine"] + 1e-12
    )


def tokens_of(mask):
    return torch.nonzero(mask).flatten().tolist()


def test_box_to_tokens_by_hand():
    g, s = (16, 16), (448, 448)
    assert tokens_of(metrics.box_mask([0, 0, 28, 28], s, g, s)) == [0]  # exactly one cell
    assert tokens_of(metrics.box_mask([27, 0, 2, 2], s, g, s)) == [0, 1]  # straddles a cell edge
    # smaller than a cell
    assert tokens_of(metrics.box_mask([5 * 28 + 3, 3 * 28 + 3, 5, 5], s, g, s)) == [3 * 16 + 5]
    # clipped at the image edge
    assert tokens_of(metrics.box_mask([440, 440, 100, 100], s, g, s)) == [255]
    assert metrics.box_mask([500, 500, 10, 10], s, g, s) is None  # outside the image
    assert metrics.box_mask([10, 10, 0, 5], s, g, s) is None  # empty
    # a 1000x300 image resized to 448x448: x scales by 0.448, y by 1.4933
    assert tokens_of(metrics.box_mask([500, 150, 10, 10], (1000, 300), g, s)) == [8 * 16 + 8]
    assert len(tokens_of(metrics.box_mask([0, 0, 1000, 300], (1000, 300), g, s))) == 256
    # a non-square grid: 448 wide x 896 high, 32 rows of 16
    assert tokens_of(metrics.box_mask([0, 868, 28, 28], (448, 896), (32, 16), (448, 896))) == [
        31 * 16
    ]


def test_recall_and_precision_by_hand():
    mask = torch.zeros(64, dtype=torch.bool)
    mask[[5, 6, 7, 8]] = True
    assert selection.box_hits(torch.tensor([5, 6, 8, 20, 21, 22, 23, 24]), mask) == (0.75, 3 / 8)


def test_box_metrics_against_numpy():
    X, Xh = small(), small(seed=5)
    mask = torch.zeros(24, dtype=torch.bool)
    mask[[1, 2, 10]] = True
    b = metrics.box_metrics(X, Xh, mask)
    x, xh = X.numpy(), Xh.numpy()
    rel = np.linalg.norm(x - xh, axis=1) / np.linalg.norm(x, axis=1)
    cos = (x * xh).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(xh, axis=1)
    inn = np.array([1, 2, 10])
    out = np.setdiff1d(np.arange(24), inn)
    assert b["rel_token_in"] == pytest.approx(rel[inn].mean()) and b[
        "rel_token_out"
    ] == pytest.approx(rel[out].mean())
    assert b["token_cosine_in"] == pytest.approx(cos[inn].mean())
    assert b["token_cosine_out"] == pytest.approx(cos[out].mean())


def test_tokens_script_end_to_end(trained, capsys):
    rows = tokens.main(
        ["--results_dir", str(trained), "--ks", "4,16", "--lrcp_rank", "8", "--draw_k", "16"]
    )
    out = capsys.readouterr().out
    # the tiny cache has a tower: visionzip's attention runs
    every = selection.RULES + merging.MERGES
    assert {(r["rule"], r["k"]) for r in rows} == {(rule, k) for rule in every for k in (4, 16)}
    random = next(r for r in rows if r["rule"] == "random")
    assert (
        random["draws"] == 5
        and random["cosine_draw_spread"] > 0
        and random["box_recall_draw_spread"] is not None
    )
    for r in rows:
        assert r["cosine"] <= r["svd_cosine"] + 1e-9  # the optimum is never beaten
        assert (
            r["box_n"] > 0
            and 0 <= r["box_recall"] <= 1
            and r["random_expected_recall"] == pytest.approx(r["k"] / 256)
        )
    for f in (
        "tokens_test.json",
        "tokens_test.csv",
        "tokens_test_cosine.png",
        "tokens_test_box.png",
        "tokens_test_kept.png",
    ):
        assert (trained / f).stat().st_size > 0, f
    per = list(csv.DictReader(open(trained / "tokens_test.csv")))
    split = json.loads((trained / "split.json").read_text())
    assert (
        len(per) == len(split["test"]) * (len(every) + 4) * 2
        and "leverage" in out
        and "visionzip" in out
    )


def test_compare_reports_inside_and_outside_the_box(trained, capsys):
    s = compare_svd_nn.main(["--results_dir", str(trained), "--device", "cpu"])
    assert "inside vs outside the answer box" in capsys.readouterr().out
    assert s["samples_with_box"] > 0 and s["svd"]["rel_token_in"]["n"] == s["samples_with_box"]
    split = json.loads((trained / "split.json").read_text())
    cfg = json.loads((trained / "config.json").read_text())
    i = split["test"][0]
    X = dataset.FeatureDataset(cfg["cache_dir"], [i])[0][0]
    mask = feature_cache.answer_box_masks(cfg["cache_dir"], [i])[i]
    ref = metrics.box_metrics(X, metrics.svd_reconstruct(X[None], 16, "svd")[0], mask)
    row = next(
        r for r in csv.DictReader(open(trained / "compare_rank16.csv")) if int(r["sample_id"]) == i
    )
    assert float(row["svd_rel_token_in"]) == pytest.approx(ref["rel_token_in"], abs=1e-6)
    assert (trained / "compare_rank16_box_error.png").exists()


def test_budgets_as_counts_or_shares():
    assert tokens.budgets("16,32", 256) == [16, 32]
    assert tokens.budgets("0.0625,0.125,0.25,0.5", 256) == [16, 32, 64, 128]
    # the same budgets on a 32 x 32 patch grid
    assert tokens.budgets("0.0625,0.25", 1024) == [64, 256]
    with pytest.raises(UserError, match="share of the tokens must lie in"):
        tokens.budgets("0.5,1.5", 256)


def naive_greedy_det(L, k):
    """Greedy DPP MAP by determinants (NumPy): each step the item whose addition gives the largest
    det L_S."""
    kept = []
    for _ in range(k):
        dets = [
            -np.inf if t in kept else np.linalg.det(L[np.ix_(kept + [t], kept + [t])])
            for t in range(len(L))
        ]
        kept.append(int(np.argmax(dets)))
    return kept


def test_question_aware_rules_against_independent_computations():
    """CDPruner's fast greedy MAP equals greedy by determinants on the same kernel built in NumPy;
    IDPruner's MMR equals a NumPy loop; relevance is the min-max scaled mean cosine to the
    question's embeddings."""
    g = torch.Generator().manual_seed(5)
    X, Q = torch.randn(40, 24, generator=g), torch.randn(3, 24, generator=g)
    x, q = X.double().numpy(), Q.double().numpy()
    xn, qn = (
        x / np.linalg.norm(x, axis=1, keepdims=True),
        q / np.linalg.norm(q, axis=1, keepdims=True),
    )
    r = (xn @ qn.T).mean(1)
    r = (r - r.min()) / (r.max() - r.min())
    rel = selection.relevance(X, Q)
    np.testing.assert_allclose(rel.numpy(), r, atol=1e-12)
    assert rel.min() == 0 and rel.max() == 1
    L = np.exp(r)[:, None] * (xn @ xn.T) * np.exp(r)[None, :]
    assert selection.select("cdpruner", X, 10, relevance=rel).tolist() == naive_greedy_det(L, 10)
    assert selection.dpp_greedy_map(torch.from_numpy(L), 10).tolist() == naive_greedy_det(L, 10)
    kept, red = [], np.zeros(40)
    for _ in range(12):
        s = 0.5 * r - 0.5 * red
        s[kept] = -np.inf
        kept.append(int(np.argmax(s)))
        red = np.maximum(red, (xn @ xn.T)[kept[-1]]) if len(kept) > 1 else (xn @ xn.T)[kept[-1]]
    assert selection.select("mmr", X, 12, relevance=rel).tolist() == kept
    with pytest.raises(ValueError, match="relevance to the question"):
        selection.select("mmr", X, 4)


def test_spare_is_the_largest_weighted_projection_residual():
    """SPARE against a NumPy loop that projects every token onto the kept tokens' span by least
    squares, each step, and takes the largest residual norm times 1 - 0.5 relevance; with lam = 0
    it is pivoted QR."""
    g = torch.Generator().manual_seed(7)
    X, Q = torch.randn(40, 24, generator=g), torch.randn(3, 24, generator=g)
    rel = selection.relevance(X, Q)
    x, w = X.double().numpy(), 1 - 0.5 * rel.numpy()
    kept = []
    for _ in range(12):
        if kept:
            S = x[kept].T  # [D, kept]
            resid = x - (S @ np.linalg.lstsq(S, x.T, rcond=None)[0]).T
        else:
            resid = x
        score = np.linalg.norm(resid, axis=1) * w
        score[kept] = -np.inf
        kept.append(int(np.argmax(score)))
    assert selection.select("spare", X, 12, relevance=rel).tolist() == kept
    assert kept != selection.pivoted_qr(X, 12).tolist()  # the relevance changes the choice
    assert torch.equal(selection.spare(X, 12, rel, lam=0.0), selection.pivoted_qr(X, 12))


def test_question_aware_rules_in_tokens_py(trained, capsys):
    """On a cache with questions, relevance comes from the tiny model's embedding table alone."""
    rows = tokens.main(
        [
            "--results_dir",
            str(trained),
            "--ks",
            "16,64",
            "--rules",
            "cdpruner,mmr,spare,norm",
            "--draw_k",
            "16",
        ]
    )
    got = {(r["rule"], r["k"]): r["cosine"] for r in rows}
    assert set(got) == {
        (rule, k) for rule in ("cdpruner", "mmr", "spare", "norm") for k in (16, 64)
    }
    assert all(0 < c <= 1 for c in got.values()) and got[("cdpruner", 64)] > got[("cdpruner", 16)]
    # what each rule needs, where it acts and its own time, at k = 64 of 256 tokens
    costs = {
        c["rule"]: c for c in json.loads((trained / "tokens_test.json").read_text())["rule_costs"]
    }
    assert [costs[r]["question_aware"] for r in ("cdpruner", "mmr", "spare", "norm")] == [
        True
    ] * 3 + [False]
    assert all(
        costs[r]["k"] == 64
        and costs[r]["acts"] == "after the tower"
        and costs[r]["ms_per_image"] > 0
        for r in ("cdpruner", "mmr", "spare", "norm")
    )
    # PixelPrune's row, on the samples' own images: these photos have no cell that repeats exactly
    prune = costs["pixelprune"]
    assert prune["acts"] == "before the tower" and prune["k"] == 256 and prune["ms_per_image"] > 0
    out = capsys.readouterr().out
    assert re.search(r"^spare\s+selection\s+after the tower\s+yes\s+no\s+64\s+\d", out, re.M)
