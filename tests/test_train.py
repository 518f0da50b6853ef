"""Training: loss terms by hand, files written, early stopping, resume, NaN handling, train.sh."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_real_data
from lowrank import metrics, model, training
from lowrank.cli import UserError
from lowrank.config import flag_fields

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--rank", "8", "--hidden", "16", "--batch_size", "8"]


def run(cache, out, *extra):
    return train_real_data.main(
        ["--cache_dir", str(cache), "--results_dir", str(out), "--device", "cpu", *SMALL, *extra]
    )


def test_loss_terms_by_hand():
    g = torch.Generator().manual_seed(0)
    X, A, B = (
        torch.randn(2, 6, 10, generator=g),
        torch.randn(2, 6, 3, generator=g),
        torch.randn(2, 3, 10, generator=g),
    )
    Xh = A @ B
    t = model.loss_terms(X, Xh, A, B, lambda_B=0.5, lambda_ortho=0.25)
    x, a, b = X.double().numpy(), A.double().numpy(), B.double().numpy()
    recon = np.mean((a @ b - x) ** 2)
    b_reg = np.mean(b**2)
    ortho = np.mean([np.sum((bb @ bb.T - np.eye(3)) ** 2) for bb in b]) / 9
    for k, v in {
        "recon": recon,
        "b_reg": b_reg,
        "ortho": ortho,
        "total": recon + 0.5 * b_reg + 0.25 * ortho,
    }.items():
        assert abs(t[k].item() - v) < 1e-4 * max(1, abs(v)), k


@pytest.mark.parametrize("arch", list(model.ARCHS))
def test_models_shapes_any_rank(arch):
    for r in (4, 16):
        m = model.build_model(
            {"arch": arch, "rank": r, "arch_options": {"hidden": 16} if arch == "symmetric" else {}}
        )
        Xh, A, B = m(torch.randn(3, 256, 2048))
        assert Xh.shape == (3, 256, 2048) and A.shape == (3, 256, r) and B.shape == (3, r, 2048)
        torch.testing.assert_close(Xh, A @ B)


def test_subspace_is_exact_when_omega_spans_the_row_space():
    """Ω = the true top right singular vectors -> the output is truncated SVD."""
    U = torch.linalg.qr(torch.randn(256, 256))[0]
    V = torch.linalg.qr(torch.randn(2048, 256))[0]
    X = (U * (0.9 ** torch.arange(256.0))) @ V.T
    m = model.Subspace(rank=16, oversample=4)
    with torch.no_grad():
        m.omega.copy_(V[:, :20])
    Xh, _, _ = m(X[None])
    torch.testing.assert_close(Xh, metrics.svd_reconstruct(X[None], 16), atol=1e-5, rtol=1e-4)
    for k in (4, 8):  # nested: the first k components are the rank-k truncation
        torch.testing.assert_close(
            m(X[None], rank=k)[0], metrics.svd_reconstruct(X[None], k), atol=1e-5, rtol=1e-4
        )


def test_training_writes_everything(tiny_cache, tmp_path):
    res = run(tiny_cache / "cache", tmp_path, "--epochs", "2")
    for f in (
        "best_model.pt",
        "last.pt",
        "split.json",
        "config.json",
        "history.json",
        "loss_curves.png",
    ):
        assert (tmp_path / f).exists(), f
    h = json.loads((tmp_path / "history.json").read_text())
    assert [r["epoch"] for r in h] == [0, 1, 2]  # epoch 0: the starting point, validated
    for k in (
        "train_recon",
        "train_b_reg",
        "train_ortho",
        "train_total",
        "val_mse",
        "val_cosine",
        "val_rel_fro",
        "val_energy",
        "lr",
        "seconds",
    ):
        assert k in h[1] and np.isfinite(h[1][k]), k
    ck = torch.load(tmp_path / "best_model.pt", weights_only=True)
    assert ck["config"]["arch"] == "symmetric" and ck["config"]["rank"] == 8
    assert ck["best_val_mse"] == min(r["val_mse"] for r in h)
    split = json.loads((tmp_path / "split.json").read_text())
    n = (len(split["train"]), len(split["val"]), len(split["test"]))
    assert sum(n) == 40 and n[0] >= 32 and min(n) >= 3  # 80/10/10 by source photo (2-3 crops each)
    assert split["grouped_by"] == "image_id" and split["shared_groups"] == 0
    assert (
        res["nn"]["cosine"]["n"] == n[2]
        and res["svd"]["cosine"]["mean"] > res["nn"]["cosine"]["mean"]
    )


def test_early_stopping_on_plateau(tiny_cache, tmp_path):
    # lr 0: the weights never change, so the validation MSE never improves on the starting point
    # (epoch 0)
    res = run(tiny_cache / "cache", tmp_path, "--epochs", "20", "--lr", "0", "--patience", "2")
    h = json.loads((tmp_path / "history.json").read_text())
    assert [r["epoch"] for r in h] == [0, 1, 2] and res["stopped"].startswith("early stop")


def test_resume_matches_uninterrupted(tiny_cache, tmp_path):
    run(tiny_cache / "cache", tmp_path / "full", "--epochs", "4", "--seed", "7")
    run(tiny_cache / "cache", tmp_path / "cut", "--epochs", "2", "--seed", "7")
    run(tiny_cache / "cache", tmp_path / "cut", "--epochs", "4", "--seed", "7", "--resume")
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ha = json.loads((tmp_path / "full" / "history.json").read_text())
    hb = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [r["val_mse"] for r in ha] == [r["val_mse"] for r in hb]


def test_nan_in_cache_is_named(tiny_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache / "cache", cache)
    x = torch.load(cache / "features_5.pt", weights_only=True)
    x[0, 0] = float("nan")
    torch.save(x, cache / "features_5.pt")
    with pytest.raises(ValueError, match="features_5.pt.*NaN"):
        run(cache, tmp_path / "r", "--epochs", "1")


def test_nonfinite_loss_stops_and_keeps_checkpoint(tiny_cache, tmp_path, monkeypatch, capsys):
    real = model.loss_terms
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        t = real(*a, **k)
        if calls["n"] > 4:  # epoch 1 has 4 steps; epoch 2 gets a NaN
            t["total"] = t["total"] * float("nan")
        return t

    monkeypatch.setattr(training, "loss_terms", poisoned)
    with pytest.raises(SystemExit):
        run(tiny_cache / "cache", tmp_path, "--epochs", "3")
    assert "NaN" in capsys.readouterr().out
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    assert (tmp_path / "best_model.pt").exists()


def test_missing_cache_names_extraction_command(tmp_path):
    with pytest.raises(UserError, match="qwenvl_dataloader.py"):
        run(tmp_path / "none", tmp_path / "r", "--epochs", "1")


def test_train_sh_positionals_and_passthrough(tiny_cache, tmp_path):
    r = subprocess.run(
        [
            str(ROOT / "train.sh"),
            "8",
            "1",
            "0.002",
            "4",
            "0.0002",
            "0.003",
            str(tmp_path / "res"),
            "--cache_dir",
            str(tiny_cache / "cache"),
            "--hidden",
            "16",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        cwd="/",
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "+ " in r.stdout and "--lambda_ortho 0.003" in r.stdout
    cfg = json.loads((tmp_path / "res" / "config.json").read_text())
    assert (
        cfg["batch_size"],
        cfg["epochs"],
        cfg["lr"],
        cfg["rank"],
        cfg["lambda_B"],
        cfg["lambda_ortho"],
    ) == (8, 1, 0.002, 4, 0.0002, 0.003)
    assert cfg["arch_options"] == {"hidden": 16, "n_blocks": 2}


@pytest.mark.parametrize("power_iters", [0, 1])
def test_subspace_objective_is_the_energy_outside_each_prefix(power_iters):
    torch.manual_seed(0)
    m = model.Subspace(rank=32, power_iters=power_iters)
    X = torch.randn(2, 256, 2048).double()
    m.double()
    Xh, A, B = m(X)
    got = model.Subspace.objective(X, A, B).item()

    def basis(x, k):  # independent, NumPy: range((x xᵀ)^p x Ω[:, :k])
        y = x @ m.omega.detach().numpy()[:, :k]
        for _ in range(power_iters):
            y = x @ (x.T @ np.linalg.qr(y)[0])
        return np.linalg.qr(y)[0]

    ref = []
    for k in (16, 32):
        out = []
        for x in X.numpy():
            q = basis(x, k)
            out.append(1 - np.sum((q @ (q.T @ x)) ** 2) / np.sum(x**2))
        ref.append(np.mean(out))
    assert abs(got - np.mean(ref)) < 1e-10
    # nested: the first k components are that projection
    q = basis(X[0].numpy(), 16)
    np.testing.assert_allclose(
        m(X, rank=16)[0][0].detach().numpy(), q @ (q.T @ X[0].numpy()), atol=1e-10
    )


def test_small_rank_uses_only_its_columns():
    """factors(X, k) from X·Ω[:, :k] alone equals the first k components of the full rank-r
    basis."""
    torch.manual_seed(1)
    m = model.Subspace(rank=32, tokens=64, dim=96, power_iters=1)
    X = torch.randn(3, 64, 96, dtype=torch.float64)
    m.double()
    with torch.no_grad():
        Q = m.basis(X, 32, 1)[0]  # all 32 columns
        for k in (4, 16, 32):
            A, B = m.factors(X, k)
            assert A.shape == (3, 64, k)
            torch.testing.assert_close(
                A @ B, Q[..., :k] @ (Q[..., :k].transpose(1, 2) @ X), atol=1e-9, rtol=1e-9
            )


def test_amp_bf16_autocast_on_cpu(tiny_cache, tmp_path):
    """--amp under torch.autocast('cpu', bfloat16): the subspace forward stays finite, its QR runs
    in float32, and the trained model's quality is within 0.002 cosine of float32 training."""
    X = torch.stack(
        [
            x
            for x, _ in __import__("qwenvl_dataloader").FeatureDataset(
                tiny_cache / "cache", list(range(8))
            )
        ]
    )
    m = model.Subspace(rank=16)
    m.init_from_data([X])
    with torch.no_grad():
        ref = m(X)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            Q = m.basis(X, 16, m.power_iters)[0]
            out = m(X)[0]
    assert Q.dtype == torch.float32 and torch.isfinite(out).all()
    assert (
        abs(
            metrics.metrics(X, out.float())["cosine"].mean()
            - metrics.metrics(X, ref)["cosine"].mean()
        )
        < 0.002
    )
    common = [
        "--arch",
        "subspace",
        "--rank",
        "16",
        "--epochs",
        "1",
        "--batch_size",
        "8",
        "--seed",
        "5",
    ]
    r32 = train_real_data.main(
        [
            "--cache_dir",
            str(tiny_cache / "cache"),
            "--results_dir",
            str(tmp_path / "f32"),
            "--device",
            "cpu",
            *common,
        ]
    )
    rbf = train_real_data.main(
        [
            "--cache_dir",
            str(tiny_cache / "cache"),
            "--results_dir",
            str(tmp_path / "bf16"),
            "--device",
            "cpu",
            "--amp",
            *common,
        ]
    )
    assert abs(r32["nn"]["cosine"]["mean"] - rbf["nn"]["cosine"]["mean"]) < 0.002
    h = json.loads((tmp_path / "bf16" / "history.json").read_text())
    assert all(np.isfinite(r["val_mse"]) for r in h)


def test_no_flag_vanishes(tiny_cache, tmp_path):
    """A flag of another arch is refused; on --resume a flag given with another value than the run's
    is refused, whatever its value (the parser's default included) and arch options too; the same
    value is accepted."""
    cache = tiny_cache / "cache"
    with pytest.raises(
        UserError, match="--hidden is an option of --arch symmetric.*arch is subspace"
    ):
        run(cache, tmp_path / "a", "--arch", "subspace", "--epochs", "1")
    with pytest.raises(UserError, match="--power_iters is an option of --arch subspace"):
        train_real_data.main(
            ["--cache_dir", str(cache), "--results_dir", str(tmp_path / "b"), "--power_iters", "2"]
        )
    sub = [
        "--cache_dir",
        str(cache),
        "--results_dir",
        str(tmp_path / "s"),
        "--arch",
        "subspace",
        "--rank",
        "8",
    ]
    train_real_data.main(sub + ["--epochs", "1", "--lr", "0.01", "--device", "cpu"])
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["lr"] == 0.01 and "schedule" in cfg["arch_options"]
    resume = [
        "--cache_dir",
        str(cache),
        "--results_dir",
        str(tmp_path / "s"),
        "--resume",
        "--device",
        "cpu",
    ]
    # 0.001 is the parser's default
    with pytest.raises(UserError, match=r"--lr 0.001 \(the run has 0.01\)"):
        train_real_data.main(resume + ["--lr", "0.001"])
    with pytest.raises(UserError, match=r"--power_iters 2 \(the run has the per-rank schedule\)"):
        train_real_data.main(resume + ["--power_iters", "2"])
    with pytest.raises(UserError, match=r"--arch symmetric \(the run has subspace\)"):
        train_real_data.main(resume + ["--arch", "symmetric"])
    # the run's own values
    train_real_data.main(resume + ["--lr", "0.01", "--rank", "8", "--epochs", "2"])
    h = json.loads((tmp_path / "s" / "history.json").read_text())
    assert [r["epoch"] for r in h] == [0, 1, 2]
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["epochs"] == 2 and cfg["lr"] == 0.01


def test_a_new_training_flag_is_one_field():
    """Every RunConfig field with a help text is a flag of training's parser, with the field's
    default in its help and no default of the parser's own (so 'given' means given)."""

    ap = training.get_args_parser()
    for name, f in flag_fields():
        action = next(a for a in ap._actions if a.dest == name)
        assert action.default is None and f"(default: {f.default})" in action.help, name
