"""compress.py against independent computations: bytes by hand, quantisation error bounds, exact
full bases, the compressed cache read transparently, quantised and pruned factorisers."""

import json

import numpy as np
import pytest
import torch

import compare_svd_nn
import compress
import train_real_data
from lowrank import dataset, feature_cache, feature_codecs, metrics, model, quantize
from lowrank.cli import UserError
from lowrank.model import Subspace, Symmetric, load_checkpoint, make_checkpoint


def X_(T_=256, D=2048, seed=0):
    return torch.randn(T_, D, generator=torch.Generator().manual_seed(seed))


def test_bytes_per_image_by_hand():
    X = X_()
    basis = torch.linalg.qr(torch.randn(2048, 64))[0]
    cases = {
        ("fp32", None): 256 * 2048 * 4,
        ("fp16", None): 256 * 2048 * 2,
        ("bf16", None): 256 * 2048 * 2,
        ("int8", None): 256 * 2048 + 256 * 4,  # codes + one float32 scale per token
        ("int4", None): 256 * 2048 // 2 + 256 * 4,  # two codes per byte
        ("svd_fp16", 32): 2 * (256 * 32 + 32 * 2048),
        ("svd_int8", 32): (256 * 32 + 32 * 2048) + 4 * (256 + 32),
        ("pca_fp16", 64): 2 * 256 * 64,
        ("pca_int8", 64): 256 * 64 + 4 * 256,
        ("pca_int4", 64): 256 * 32 + 4 * 256,
    }
    for (codec, r), want in cases.items():
        assert feature_codecs.payload_bytes(feature_codecs.encode(codec, X, r, basis)) == want, (
            codec
        )


@pytest.mark.parametrize("bits", [8, 4])
def test_quantisation_round_trip_error_bound(bits):
    Y = X_(37, 101, seed=1)  # odd sizes: int4 packing pads one nibble
    p = quantize.quantize_rows(Y, bits)
    err = (quantize.dequantize_rows(p) - Y).abs()
    half_step = Y.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1) / 2
    # round-to-nearest: at most half a step per entry
    assert (err <= half_step * (1 + 1e-5) + 1e-7).all()
    assert quantize.dequantize_rows(p).shape == Y.shape


def test_full_dimension_basis_is_exact():
    X = X_(64, 96)
    # a complete orthonormal basis
    basis = torch.linalg.qr(torch.randn(96, 96, dtype=torch.float64))[0].float()
    torch.testing.assert_close(
        feature_codecs.decode("pca_fp16", feature_codecs.encode("pca_fp16", X, 96, basis), basis),
        X,
        atol=5e-3,
        rtol=1e-3,
    )
    Xd = X.double()
    b = torch.linalg.qr(torch.randn(96, 96, dtype=torch.float64))[0]
    torch.testing.assert_close((Xd @ b) @ b.T, Xd)  # the projection itself is exact
    # a shared basis of the data's own span is exact too (the PCA of a rank-20 data set at rank 20)
    L = torch.randn(50, 20, dtype=torch.float64) @ torch.randn(20, 96, dtype=torch.float64)
    V = torch.linalg.eigh(L.T @ L)[1][:, -20:]
    torch.testing.assert_close((L @ V) @ V.T, L, atol=1e-9, rtol=1e-9)


def test_study_cache_and_training_on_it(trained, tmp_path, capsys):
    rows = compress.main(
        [
            "study",
            "--results_dir",
            str(trained),
            "--ranks",
            "8,16",
            "--codecs",
            "fp32,int8,int4,svd_int8,pca_int8,omega_int8",
        ]
    )
    assert {r["codec"] for r in rows} >= {"fp32", "int8", "svd_int8", "pca_int8", "omega_int8"}
    fp32 = next(r for r in rows if r["codec"] == "fp32")
    assert fp32["cosine"] == pytest.approx(1.0) and fp32["pareto"]
    assert all(r["rank"] <= 16 for r in rows if r["codec"].startswith("omega"))  # Ω has 16 columns
    for f in ("rd_test.json", "rd_test.csv", "rd_test.png"):
        assert (trained / f).exists()
    out = tmp_path / "c"
    m = compress.main(
        [
            "cache",
            "--results_dir",
            str(trained),
            "--codec",
            "pca_int8",
            "--rank",
            "64",
            "--out",
            str(out),
        ]
    )
    cfg = json.loads((trained / "config.json").read_text())
    ds_src = dataset.FeatureDataset(cfg["cache_dir"])
    ds_c = dataset.FeatureDataset(out)
    basis = torch.load(out / "basis.pt", weights_only=True)
    cos = []
    for k in range(len(ds_src)):
        x, i = ds_src[k]
        y = feature_codecs.decode(
            "pca_int8", feature_codecs.encode("pca_int8", x, 64, basis), basis
        )
        # read transparently
        torch.testing.assert_close(ds_c[k][0], feature_cache.normalize(y), atol=1e-5, rtol=1e-5)
        cos.append(metrics.metrics(x[None], y[None])["cosine"].item())
    # the manifest's figure, recomputed
    assert m["codec"]["cosine_mean"] == pytest.approx(np.mean(cos), abs=1e-9)
    assert m["codec"]["cosine_std"] == pytest.approx(np.std(cos, ddof=1), abs=1e-9)
    assert "LOSSY" in feature_cache.lossy_note(out) and "pca_int8" in feature_cache.lossy_note(out)
    # every script runs on it unchanged, and says the features are lossy
    res = train_real_data.main(
        [
            "--cache_dir",
            str(out),
            "--results_dir",
            str(tmp_path / "r"),
            "--device",
            "cpu",
            "--rank",
            "8",
            "--arch",
            "subspace",
            "--epochs",
            "1",
            "--batch_size",
            "8",
        ]
    )
    assert res["nn"]["cosine"]["n"] > 0
    s = compare_svd_nn.main(["--results_dir", str(tmp_path / "r"), "--device", "cpu"])
    assert "LOSSY" in capsys.readouterr().out and "pca_int8" in s["lossy"]
    with pytest.raises(UserError, match="already a compressed cache"):
        compress.main(
            [
                "cache",
                "--results_dir",
                str(tmp_path / "r"),
                "--codec",
                "int8",
                "--out",
                str(tmp_path / "cc"),
            ]
        )


def test_quantised_models_close_to_float():
    torch.manual_seed(0)
    X = feature_cache.normalize(X_(256, 2048)[None].repeat(2, 1, 1) + torch.randn(2, 256, 2048))
    sym = Symmetric(rank=8, hidden=32).eval()
    q, _ = compress.quantize_model(sym)
    with torch.no_grad():
        a, b = sym(X)[0], q(X)[0]
    # int8 dynamic quantisation: a few per cent at most
    assert ((a - b).norm() / a.norm()).item() < 0.05
    sub = Subspace(rank=16).eval()
    q, extra = compress.quantize_model(sub)
    w, wq = sub.omega.detach(), q.omega.detach()
    step = w.abs().amax(0) / 127  # per column of Ω
    assert ((w - wq).abs() <= step / 2 * (1 + 1e-5) + 1e-8).all() and extra["omega_int8"][
        "codes"
    ].dtype == torch.int8


@pytest.mark.parametrize("amount", [0.3, 0.5, 0.7])
def test_pruning_leaves_the_stated_share_of_zeros(amount):
    torch.manual_seed(0)
    m, zeros = compress.prune_model(Symmetric(rank=8, hidden=32), amount)
    ws = [mod.weight for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    share = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
    assert share == pytest.approx(amount, abs=1e-3) and zeros == pytest.approx(share)
    assert not any(hasattr(mod, "weight_orig") for mod in m.modules())  # pruning made permanent


def test_int8_symmetric_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = Symmetric(rank=8, tokens=256, dim=2048, hidden=32).eval()
    q, _ = compress.quantize_model(m)

    cfg = {
        "arch": "symmetric",
        "rank": 8,
        "arch_options": {"hidden": 32, "n_blocks": 2},
        "compressed": "int8",
    }
    ck = make_checkpoint(m, cfg, 1, 0.0)
    ck["model"] = model.quantized_state(q)
    torch.save(ck, tmp_path / "q.pt")
    loaded, _ = load_checkpoint(tmp_path / "q.pt")
    mods = dict(loaded.named_modules())
    n = 0
    for name, a in q.named_modules():
        # the float weight is exactly the int8 one, dequantised
        if isinstance(a, torch.ao.nn.quantized.dynamic.Linear):
            torch.testing.assert_close(mods[name].weight, a.weight().dequantize(), rtol=0, atol=0)
            n += 1
    assert n == len([x for x in m.modules() if isinstance(x, torch.nn.Linear)])
    assert sum(v.numel() for k, v in ck["model"].items() if k.endswith("weight_int8")) > 0


def test_compressed_checkpoints_load_for_compare(trained, tmp_path):
    rows = compress.main(["model", "--results_dir", str(trained)])
    assert [r["variant"] for r in rows] == [
        "float32",
        "int8",
        "pruned 30%",
        "pruned 50%",
        "pruned 70%",
    ]
    int8 = next(r for r in rows if r["variant"] == "int8")
    assert int8["bytes"] < rows[0]["bytes"] / 3  # Ω as int8
    m, ck = load_checkpoint(int8["file"])
    assert ck.config["compressed"] == "int8"
    s = compare_svd_nn.main(
        ["--results_dir", str(trained), "--checkpoint", int8["file"], "--device", "cpu"]
    )
    assert s["nn"]["cosine"]["mean"] == pytest.approx(int8["cosine"], abs=1e-4)


def test_each_program_takes_only_its_own_flags(tmp_path):
    """compress.py's three programs are subcommands: a flag of another program is refused at parse
    time (it was accepted and ignored when one parser held them all), and cache needs --out."""
    from helpers import run_script

    for args, refused in [
        (["cache", "--out", tmp_path / "o", "--num_samples", "3"], "--num_samples 3"),
        (["model", "--codec", "int8"], "--codec int8"),
        (["study", "--out", tmp_path / "o"], "--out"),
    ]:
        r = run_script("compress.py", *args)
        assert r.returncode == 2 and f"unrecognized arguments: {refused}" in r.stderr, r.stderr
    r = run_script("compress.py", "cache")
    assert r.returncode == 2 and "required: --out" in r.stderr
    assert not (tmp_path / "o").exists()
