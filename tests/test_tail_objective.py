"""lowrank/tail_objective.py and train_real_data.py --tail_weight: a factoriser trained for what the
shipped ViT computes after the cut."""

import json

import pytest
import torch

import compare_svd_nn
import train_real_data
import vit_downstream
from lowrank import feature_cache, runs, vit
from lowrank.cli import UserError
from lowrank.images import Source
from lowrank.metrics import pearson
from lowrank.tail_objective import TailTarget


def test_the_loss_is_zero_on_the_unmodified_tokens_and_onnxruntimes_on_a_rank_4_svd(vit_cache):
    """The target is the network's own output: the cached tokens score 0; a rank-4 SVD scores
    (1 - final patch-token cosine) + (1 - saliency Pearson r) as onnxruntime's graph gives them."""
    cache = vit_cache / "block_3"
    idx = feature_cache.cached_indices(cache)[:4]
    target = TailTarget(cache, idx, "layernorm", "cpu")
    Xn = feature_cache.normalize(target.tokens, "layernorm")
    with torch.no_grad():
        assert target.loss(Xn, idx).item() == pytest.approx(0, abs=1e-5)
        U, S, Vh = torch.linalg.svd(Xn.double(), full_matrices=False)
        Xh = ((U[..., :4] * S[:, None, :4]) @ Vh[:, :4]).float()
        ours = target.loss(Xh, idx).item()
    cut = vit.Cut(3)
    Xd = feature_cache.denormalize(Xh, target.tokens, "layernorm")
    full = vit.ViT(["block_3", "final_norm", vit.SALIENCY])
    from PIL import Image

    source = Source(feature_cache.load_manifest(cache).source_path)
    ref = full([Image.open(source.image(i)) for i in idx])
    final = cut.rest(torch.cat([ref["block_3"][:, :1], Xd], 1))
    maps = cut.head(final)
    cos = torch.nn.functional.cosine_similarity(
        final[:, 1:].double(), ref["final_norm"][:, 1:].double(), dim=-1
    )
    r = pearson(maps.double(), ref[vit.SALIENCY][:, 0].double())
    assert ours == pytest.approx(((1 - cos).mean() + (1 - r).mean()).item(), abs=1e-4)
    assert ours > 0.05


def test_a_tail_weight_run_trains_records_and_resumes_only_with_it(vit_cache, tmp_path):
    run = tmp_path / "r"
    base = ["--cache_dir", str(vit_cache / "block_3"), "--results_dir", str(run), "--arch"]
    base += ["subspace", "--rank", "8", "--test_share", "0.3", "--device", "cpu"]
    train_real_data.main(base + ["--epochs", "1", "--tail_weight", "1", "--out_map", "1"])
    cfg, _ = runs.read_run(run)
    assert cfg.tail_weight == 1 and cfg.arch_options["out_map"] == 1
    history = json.loads((run / "history.json").read_text())
    assert all("val_tail" in h and h["val_tail_objective"] > h["val_tail"] for h in history), (
        history
    )
    model = runs.load_run(run).model
    assert model.out_map is not None and model.out_map.shape == (384,)
    with pytest.raises(UserError, match="--tail_weight"):
        train_real_data.main(base + ["--epochs", "2", "--tail_weight", "0.5", "--resume"])
    summary = compare_svd_nn.main(["--results_dir", str(run), "--rank", "8", "--device", "cpu"])
    assert set(summary["tail"]) == {"svd", "nn"} and 0 < summary["tail"]["svd"] < 4
    rows = vit_downstream.main(
        ["--results_dir", str(run), "--families", "svd,nn", "--budgets", "4,8"]
        + ["--out_dir", str(tmp_path / "d")]
    )
    by = {r["condition"]: r for r in rows}
    assert by["original"]["token_cosine"] == pytest.approx(1, abs=1e-6)
    assert by["svd:4"]["token_cosine"] < by["svd:8"]["token_cosine"] < 1
    paired = json.loads((tmp_path / "d" / "vit_downstream_test.json").read_text())
    diff = paired["paired_nn_minus_svd"]["nn:8"]
    for k in ("token_cosine", "saliency_r", "roi_iou", "final_cosine", "retrieval_at_1"):
        mean, lo, hi = diff[k]
        assert lo <= mean <= hi
    assert diff["saliency_r"][0] == pytest.approx(
        by["nn:8"]["saliency_r"] - by["svd:8"]["saliency_r"], abs=1e-9
    )


def test_a_tail_weight_on_a_cache_without_the_vit_is_refused_before_the_run_folder(
    tiny_cache, tmp_path
):
    with pytest.raises(UserError, match="not a block cache of vit_features.py"):
        train_real_data.main(
            ["--cache_dir", str(tiny_cache / "cache"), "--results_dir", str(tmp_path / "r")]
            + ["--tail_weight", "1", "--rank", "8"]
        )
    assert not (tmp_path / "r").exists()
