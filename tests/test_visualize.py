"""visualize_svd_nn.py: the drawn arrays are the computed ones, scales are shared, errors are
clear."""

import json
import re

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import visualize_svd_nn
from lowrank import feature_cache, metrics
from lowrank.cli import UserError
from lowrank.model import load_checkpoint  # noqa: E402


def test_figures_files_and_arrays(trained, tmp_path):
    d, paths = visualize_svd_nn.main(
        [
            "--results_dir",
            str(trained),
            "--image_idx",
            "1",
            "--out",
            str(tmp_path),
            "--channels",
            "0-2,100",
        ]
    )
    split = json.loads((trained / "split.json").read_text())
    sid = split["test"][1]
    assert [p.name for p in paths] == [
        f"test1_sample{sid}_rank16_{n}"
        for n in ("channels.png", "errors.png", "spectrum.png", "interactive.html")
    ]
    assert all(p.stat().st_size > 1000 for p in paths)
    # independent recomputation of what must be drawn
    model, ck = load_checkpoint(trained / "best_model.pt")
    cfg = ck.config
    raw = torch.load(feature_cache.feature_path(cfg["cache_dir"], sid), weights_only=True).float()
    X = torch.nn.functional.layer_norm(raw, (2048,))
    svd = metrics.svd_reconstruct(X[None], 16, "svd")[0]
    fig = visualize_svd_nn.fig_channels(d, [0, 1, 2, 100], "t", "subspace")
    ax = np.array(fig.axes[:20]).reshape(5, 4)  # the image axes come first, colour bars after
    for j, c in enumerate([0, 1, 2, 100]):
        orig = ax[0, j].images[0].get_array()
        # token t at (t//16, t%16)
        np.testing.assert_allclose(orig, X[:, c].reshape(16, 16).numpy(), atol=1e-5)
        np.testing.assert_allclose(
            ax[1, j].images[0].get_array(), svd[:, c].reshape(16, 16).numpy(), atol=1e-4
        )
        np.testing.assert_allclose(
            ax[3, j].images[0].get_array(),
            (X[:, c] - svd[:, c]).abs().reshape(16, 16).numpy(),
            atol=1e-4,
        )
        clims = {ax[i, j].images[0].get_clim() for i in range(3)}
        assert len(clims) == 1  # one colour scale per channel for original, SVD and NN
        assert ax[3, j].images[0].get_clim() == ax[4, j].images[0].get_clim()
    plt.close(fig)
    err = (X - svd).norm(dim=1)
    np.testing.assert_allclose(d["svd_err"].numpy(), err.numpy(), rtol=1e-4, atol=1e-5)
    fig = visualize_svd_nn.fig_errors(d, "t", "subspace")
    e_svd, e_nn = fig.axes[0].images[0], [a for a in fig.axes if a.images][2].images[0]
    np.testing.assert_allclose(e_svd.get_array(), err.reshape(16, 16).numpy(), rtol=1e-4, atol=1e-5)
    assert e_svd.get_clim() == e_nn.get_clim()
    plt.close(fig)
    html = paths[3].read_text()
    assert '"channels": [0, 1, 2, 3' in html and "100]" in html and "<script>" in html
    assert not re.search(r"__[A-Z]+__", html.split("-->", 1)[1])  # every template field filled
    # what the page draws, recomputed independently from the raw features (numpy, float64)
    D = json.loads(html.split("const D=", 1)[1].split(";\n", 1)[0])
    ch = D["channels"]
    x = X.double().numpy()[:, ch].T
    nn = model(X[None])[0][0].detach().double().numpy()[:, ch].T
    s_ = svd.double().numpy()[:, ch].T
    for i in range(len(ch)):
        lo, hi = (
            min(x[i].min(), s_[i].min(), nn[i].min()),
            max(x[i].max(), s_[i].max(), nn[i].max()),
        )
        for v in ("X", "svd", "nn"):
            # one scale for the three
            assert D["views"][v]["scale"][i] == pytest.approx([lo, hi], abs=1e-4)
        emax = max(np.abs(x[i] - s_[i]).max(), np.abs(x[i] - nn[i]).max())
        assert (
            D["views"]["esvd"]["scale"][i]
            == D["views"]["enn"]["scale"][i]
            == pytest.approx([0, emax], abs=1e-4)
        )
        np.testing.assert_allclose(D["views"]["esvd"]["values"][i], np.abs(x[i] - s_[i]), atol=2e-4)
    err = np.linalg.norm(X.double().numpy() - svd.double().numpy(), axis=1)
    np.testing.assert_allclose(D["views"]["svd_err"]["values"], err, atol=2e-4)
    assert D["views"]["svd_err"]["scale"] == D["views"]["nn_err"]["scale"]
    assert (
        D["views"]["esvd"]["cmap"] == "magma"
        and D["views"]["X"]["cmap"] == "viridis"
        and len(D["lut"]["magma"]) == 256
    )
    assert (D["rows"], D["cols"]) == (16, 16) and '<img id="img"' in html and D["bbox"] is not None


def test_bbox_scaled_to_448(trained, tmp_path):
    assert metrics.scale_bbox([100, 50, 300, 100], (1000, 300)) == pytest.approx(
        [44.8, 74.6667, 134.4, 149.3333], abs=1e-3
    )
    d = visualize_svd_nn.compute(
        torch.randn(256, 2048), load_checkpoint(trained / "best_model.pt")[0], 16, (16, 16)
    )
    fig = visualize_svd_nn.fig_errors(
        d, "t", "s", np.zeros((448, 448, 3), np.uint8), [44.8, 74.7, 134.4, 149.3]
    )
    rect = [p for a in fig.axes for p in a.patches][0]
    assert rect.get_xy() == pytest.approx((44.8, 74.7)) and rect.get_width() == pytest.approx(134.4)
    assert len([a for a in fig.axes if a.images]) == 6  # maps + the image overlay for SVD and NN
    plt.close(fig)


def test_training_sample_is_named_as_such(trained, tmp_path, capsys):
    split = json.loads((trained / "split.json").read_text())
    sid = split["train"][2]
    d, paths = visualize_svd_nn.main(
        ["--results_dir", str(trained), "--sample_id", str(sid), "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert paths[0].name == f"train2_sample{sid}_rank16_channels.png"
    assert "training split" in out and "SEEN IN TRAINING" in paths[3].read_text()


def test_out_of_range_index_gives_valid_range(trained):
    n = len(json.loads((trained / "split.json").read_text())["test"])
    with pytest.raises(UserError, match=rf"out of range.*\(0\.\.{n - 1}\)"):
        visualize_svd_nn.main(["--results_dir", str(trained), "--image_idx", str(n)])
    with pytest.raises(UserError, match="not in cache"):
        visualize_svd_nn.main(["--results_dir", str(trained), "--sample_id", "99999"])


def test_parse_channels():
    assert visualize_svd_nn.parse_channels("0-3,9", 2048) == [0, 1, 2, 3, 9]
    with pytest.raises(UserError, match="channels must lie in 0..2047"):
        visualize_svd_nn.parse_channels("2040-2050", 2048)
