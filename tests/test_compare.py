"""compare_svd_nn.py: rebuilds the model from the checkpoint alone, pairs NN and SVD on the split's
samples."""

import csv
import json

import pytest
import torch

import compare_svd_nn
from lowrank import dataset, metrics
from lowrank.cli import UserError
from lowrank.model import build_model


def test_compare_writes_and_agrees_with_independent_eval(trained, capsys):
    s = compare_svd_nn.main(["--results_dir", str(trained), "--rank", "16", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "NN - SVD (paired)" in printed and "ms per sample" in printed
    split = json.loads((trained / "split.json").read_text())
    assert s["n"] == len(split["test"]) >= 3
    # recompute every number independently of compare's own loop
    ck = torch.load(trained / "best_model.pt", weights_only=True)

    m = build_model(ck["config"]).eval()
    m.load_state_dict(ck["model"])
    X = torch.stack(
        [dataset.FeatureDataset(tiny_cache_dir(trained), [i])[0][0] for i in split["test"]]
    )
    with torch.no_grad():
        nn = metrics.metrics(X, m(X)[0])
    svd = metrics.metrics(X, metrics.svd_reconstruct(X, 16, "svd"))
    for k in metrics.METRICS:
        assert abs(s["nn"][k]["mean"] - nn[k].mean().item()) < 1e-5, k
        assert abs(s["svd"][k]["mean"] - svd[k].mean().item()) < 1e-5, k
        assert abs(s["nn_minus_svd"][k]["mean"] - (nn[k] - svd[k]).mean().item()) < 1e-5, k
    rows = list(csv.DictReader(open(trained / "compare_rank16.csv")))
    assert [int(r["sample_id"]) for r in rows] == split["test"]
    assert abs(float(rows[0]["nn_cosine"]) - nn["cosine"][0].item()) < 1e-6
    for f in (
        "compare_rank16.json",
        "compare_rank16_cosine_hist.png",
        "compare_rank16_scatter.png",
        "compare_rank16_energy.png",
    ):
        assert (trained / f).exists(), f
    assert s["svd"]["cosine"]["mean"] >= s["nn"]["cosine"]["mean"] - 1e-9  # SVD is the optimum


def tiny_cache_dir(results):
    return json.loads((results / "config.json").read_text())["cache_dir"]


def test_rank_mismatch_is_an_error(trained):
    with pytest.raises(UserError, match="--rank 128 disagrees.*rank 16"):
        compare_svd_nn.main(["--results_dir", str(trained), "--rank", "128"])


def test_missing_checkpoint_says_train_first(tmp_path):
    with pytest.raises(UserError, match="train"):
        compare_svd_nn.main(["--results_dir", str(tmp_path)])
