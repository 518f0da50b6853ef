"""torchrun on CPU (gloo): 2-process training matches 1 process; sharded extraction covers every
sample once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import vqa_eval
from lowrank import feature_cache

ROOT = Path(__file__).resolve().parent.parent


def torchrun(n, script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={n}",
            str(ROOT / script),
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_ddp_two_processes_match_one(tiny_cache, tmp_path):
    common = [
        "--cache_dir",
        tiny_cache / "cache",
        "--rank",
        "8",
        "--hidden",
        "16",
        "--epochs",
        "3",
        "--seed",
        "3",
        "--device",
        "cpu",
    ]
    # 2 processes x batch 4 see the same 8 samples per step as 1 process x batch 8
    # (DistributedSampler order)
    out2 = torchrun(
        2, "train_real_data.py", *common, "--batch_size", "4", "--results_dir", tmp_path / "ddp"
    )
    torchrun(
        1, "train_real_data.py", *common, "--batch_size", "8", "--results_dir", tmp_path / "one"
    )
    assert out2.count("epoch   1 |") == 1  # rank 0 alone logs
    h2 = json.loads((tmp_path / "ddp" / "history.json").read_text())
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())
    assert len(h1) == len(h2) == 4  # epoch 0 (the starting point) + 3
    for a, b in zip(h1, h2):
        for k in ("val_mse", "val_cosine", "val_energy", "train_recon")[: 4 if a["epoch"] else 3]:
            assert abs(a[k] - b[k]) <= 1e-4 * abs(a[k]) + 1e-7, (k, a[k], b[k])
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 2
    ck = torch.load(tmp_path / "ddp" / "best_model.pt", weights_only=True)
    # same checkpoint format as one process
    assert not any(k.startswith("module.") for k in ck["model"])
    # --resume under DDP continues from the saved epoch
    out = torchrun(
        2,
        "train_real_data.py",
        *common[:-4],
        "--epochs",
        "4",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--batch_size",
        "4",
        "--results_dir",
        tmp_path / "ddp",
        "--resume",
    )
    assert "resumed from" in out and "epoch   4 |" in out
    assert len(json.loads((tmp_path / "ddp" / "history.json").read_text())) == 5


def test_sharded_extraction(tiny_cache, tmp_path):
    src = tiny_cache / "data"
    out = torchrun(
        2,
        "qwenvl_dataloader.py",
        "--dataset_dir",
        src,
        "--model",
        "tiny-random",
        "--cache_dir",
        tmp_path / "c",
        "--device",
        "cpu",
    )
    assert "extracted 40, skipped 0" in out
    assert not list((tmp_path / "c").glob("manifest.rank*"))
    m = feature_cache.load_manifest(tmp_path / "c")
    ref = feature_cache.load_manifest(tiny_cache / "cache")
    assert m.samples == ref.samples and m.failed == {}
    for i in range(40):
        assert torch.equal(
            feature_cache.read_feature(feature_cache.feature_path(tmp_path / "c", i)),
            feature_cache.read_feature(feature_cache.feature_path(tiny_cache / "cache", i)),
        ), i


def test_vqa_eval_sharded_over_two_processes_equals_one(trained, tmp_path):
    """torchrun --nproc_per_node=2 vqa_eval.py: each rank answers every other sample into its own
    log, rank 0 merges them and reports once; every answer and every accuracy equals the
    single-process run's."""

    common = [
        "--results_dir",
        trained,
        "--model",
        "tiny-random",
        "--split",
        "train",
        "--limit",
        "5",
    ]
    common += [
        "--svd_ranks",
        "8",
        "--nn_ranks",
        "16",
        "--rules",
        "random",
        "--keep",
        "16",
        "--zeros",
        "--device",
        "cpu",
    ]
    out = torchrun(2, "vqa_eval.py", *common, "--out_dir", tmp_path / "two", "--batch_size", "2")
    assert out.count("wrote ") == 1  # rank 0 alone reports
    logs = {
        p.name: p.read_text().splitlines()[1:] for p in sorted((tmp_path / "two").glob("*.jsonl"))
    }
    assert sorted(logs) == ["vqa_train.rank0.jsonl", "vqa_train.rank1.jsonl"]
    per_rank = [{json.loads(line)["sample"] for line in lines} for lines in logs.values()]
    assert len(per_rank[0]) == 3 and len(per_rank[1]) == 2 and not per_rank[0] & per_rank[1]
    vqa_eval.main(
        [str(a) for a in common] + ["--out_dir", str(tmp_path / "one"), "--batch_size", "5"]
    )
    two, one = (json.loads((tmp_path / d / "vqa_train.json").read_text()) for d in ("two", "one"))
    conds = [s["condition"] for s in one["summary"]]
    assert [s["condition"] for s in two["summary"]] == conds and len(conds) == 5
    assert [{c: r[c]["answer"] for c in conds} for r in two["samples"]] == [
        {c: r[c]["answer"] for c in conds} for r in one["samples"]
    ]
    for a, b in zip(two["summary"], one["summary"]):
        assert (a["vqa_acc"], a["consistency"], a["prefill_flops"]) == (
            b["vqa_acc"],
            b["consistency"],
            b["prefill_flops"],
        )
