"""The field's baselines as rules (DivPrune, DART, pooling, ToMe, VisionZip), each pinned to an
independent NumPy computation or a small hand example; the tower's attention that VisionZip needs,
against the block's own output."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vqa_eval
from lowrank import demo_set, encoders, images, merging, selection, transforms, vlm
from lowrank.cli import UserError


def feats(T=40, D=12, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((T, D)))


def np_divprune(X, k):
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    d = 1 - Xn @ Xn.T
    off = d + np.diag(np.full(len(X), np.inf))
    kept = [int(np.argmax(off.min(0)))]
    while len(kept) < k:
        score = d[kept].min(0)
        score[kept] = -1
        kept.append(int(np.argmax(score)))
    return kept


def test_divprune_equals_an_independent_numpy_greedy():
    for seed in range(3):
        X = feats(seed=seed)
        assert selection.divprune(X, 10).tolist() == np_divprune(X.numpy(), 10)


def test_divprune_keeps_one_of_each_duplicate_cluster():
    """Three tight clusters of 5 near-copies: 3 kept tokens are one from each cluster."""
    centres = torch.eye(3, 8, dtype=torch.float64)
    X = torch.cat([c + 1e-3 * feats(5, 8, i) for i, c in enumerate(centres)])
    kept = selection.divprune(X, 3)
    assert sorted(int(t) // 5 for t in kept) == [0, 1, 2]


def test_dart_by_hand():
    """Pivots: the tokens of largest L1 norm; then in turn per pivot the token least similar to it,
    not yet kept."""
    X = torch.tensor(
        [[5.0, 0], [0, 4], [1, 1], [-1, 0.1], [0.2, -1], [1, 0.9]], dtype=torch.float64
    )
    # L1 norms 5, 4, 2, 1.1, 1.2, 1.9: pivots 0 and 1. Least similar to pivot 0 ([1, 0]): token 3
    # (cos -0.995); to pivot 1 ([0, 1]): token 4 (cos -0.98); then pivot 0 again: token 4 is taken,
    # next token 1 is taken, then 2 (cos .707) vs 5 (cos .743): token 2
    assert selection.dart(X, 5, pivots=2).tolist() == [0, 1, 3, 4, 2]
    assert len(set(selection.dart(feats(), 17).tolist())) == 17


@pytest.mark.parametrize("k", [16, 32, 64, 128, 12])
def test_pool_equals_adaptive_average_pooling(k):
    H = W = 16
    X = feats(H * W, 6)
    Wt, reps = merging.merge("pool", X, k, (H, W))
    gh, gw = merging.pool_shape((H, W), k)
    ref = F.adaptive_avg_pool2d(X.T.reshape(1, 6, H, W), (gh, gw)).reshape(6, k).T
    torch.testing.assert_close(Wt @ X, ref)
    assert gh * gw == k and torch.equal(reps, reps.sort().values)
    # 2 x 2 cells: the representative is each cell's top-left-of-centre token
    if (gh, gw) == (8, 8):
        assert reps[:2].tolist() == [0, 2] and reps[8] == 2 * W


def np_tome(X, k):
    groups = [[t] for t in range(len(X))]
    while len(groups) > k:
        m = np.stack([X[g].mean(0) for g in groups])
        m = m / np.linalg.norm(m, axis=1, keepdims=True)
        a, b = list(range(0, len(groups), 2)), list(range(1, len(groups), 2))
        sim = m[a] @ m[b].T
        best, dst = sim.max(1), sim.argmax(1)
        r = min(len(groups) - k, len(a))
        src = sorted(range(len(a)), key=lambda i: -best[i])[:r]
        new = {bi: list(groups[bi]) for bi in b}
        for i in src:
            new[b[dst[i]]] += groups[a[i]]
        keep = [groups[a[i]] if i not in src else None for i in range(len(a))]
        order = sorted(
            [(a[i], keep[i]) for i in range(len(a)) if keep[i] is not None] + list(new.items())
        )
        groups = [sorted(g) for _, g in order]
    return groups


def test_tome_equals_an_independent_numpy_matching():
    X = feats(30, 5, seed=4)
    Wt, reps = merging.merge("tome", X, 7)
    groups = np_tome(X.numpy(), 7)
    assert [sorted(torch.nonzero(row).squeeze(1).tolist()) for row in Wt] == groups
    torch.testing.assert_close(Wt @ X, torch.stack([X[g].mean(0) for g in groups]))
    # a partition
    assert torch.equal(Wt.sum(1), torch.ones(7, dtype=Wt.dtype)) and (Wt > 0).sum(0).eq(1).all()
    assert all(int(r) in g for r, g in zip(reps, groups))


def test_visionzip_by_hand():
    """8 tokens, k = 4: c = 1 contextual token; the 3 most attended are dominant, the other 5 form
    one cluster around the middle remaining token (evenly spaced targets: one target at the middle
    of the rest)."""
    X = feats(8, 4)
    att = torch.tensor([0.3, 0.05, 0.2, 0.05, 0.05, 0.25, 0.05, 0.05])
    Wt, reps = merging.merge("visionzip", X, 4, attention=att)
    # dominant: 0, 5, 2; the rest 1, 3, 4, 6, 7, target rest[round(0 * 4)] = rest[0] = 1
    # (linspace(0, 4, 1) = [0])
    assert reps.tolist() == [0, 1, 2, 5]
    torch.testing.assert_close(Wt @ X, torch.stack([X[0], X[[1, 3, 4, 6, 7]].mean(0), X[2], X[5]]))
    Wt, reps = merging.merge("visionzip", feats(256, 6), 64, attention=torch.rand(256))
    # VisionZip's 54 dominant + 10 contextual
    assert len(reps) == 64 and (Wt > 0).sum(1).eq(1).sum() == 54


def test_merge_specs_and_the_tower():
    """merge:<rule>:<k> round-trips; the tower gives the merged means of the model-scale tokens at
    the representatives' positions; merging into T groups of one is the original."""
    for text in (
        "merge:pool:64",
        "merge:tome:32",
        "merge:visionzip:64",
        "keep:divprune:16",
        "keep:dart:8",
        "fastv:2:64",
    ):
        assert str(transforms.parse_spec(text)) == text
    X = feats(256, 16).float() * 3 + 1
    tower = transforms.Tower(X, transforms.TokenSetup("layernorm", (16, 16)))
    out = tower.apply(transforms.parse_spec("merge:pool:64"))
    tokens, kept = out.tokens, out.kept
    Wt, reps = merging.merge("pool", X, 64, (16, 16))
    torch.testing.assert_close(tokens, (Wt @ X.double()).float())
    assert torch.equal(kept, reps)
    for spec in ("merge:pool:256", "merge:tome:256"):
        out = tower.apply(transforms.parse_spec(spec))
        torch.testing.assert_close(out.tokens, X)
        assert torch.equal(out.kept, torch.arange(256))
    with pytest.raises(UserError, match="visionzip needs the vision tower's attention"):
        transforms.check_spec(transforms.parse_spec("merge:visionzip:64"), 256, 16, attention=False)
    with pytest.raises(UserError, match="pool: 7 cells"):
        transforms.check_spec(transforms.parse_spec("merge:pool:7"), 16, 16, hw=(4, 4))


def test_tower_attention_is_the_blocks_own():
    """attention_received recomputes softmax(q kᵀ / √d) of the tower's last full-attention block:
    with v and the output projection it gives exactly that block's attention output; each image's
    attention sums to 1; the un-permutation equals argsort of transformers' own window index."""
    enc = encoders.Encoder(encoders.TINY, "cpu")
    ims = [
        images.load_image(r["image"]["bytes"], (448, 448)) for r in demo_set.make_rows(2, seed=1)
    ]
    inp = enc.processor(images=ims, return_tensors="pt")
    out, att, check = encoders.attention_received(
        enc.tower, inp["pixel_values"], inp["image_grid_thw"], check=True
    )
    assert att.shape == (2, 256) and torch.allclose(att.sum(1), torch.ones(2, dtype=att.dtype))
    torch.testing.assert_close(check["recomputed"], check["actual"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, enc(ims).reshape(-1, enc.dim))
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m

    tw = enc.tower
    index, _ = m.get_vision_window_index(
        inp["image_grid_thw"],
        spatial_merge_size=tw.spatial_merge_size,
        window_size=tw.window_size,
        patch_size=tw.patch_size,
    )
    assert torch.equal(check["order"], torch.argsort(index))


def test_every_new_kind_downstream(trained, tmp_path):
    """vqa_eval with one condition of each new kind on the tiny model: each answers with its k
    tokens at their representatives' positions; merging into 256 groups of one (pool, tome) answers
    exactly as the original."""
    import json

    specs = (
        "keep:divprune:32,keep:dart:32,merge:pool:64,merge:tome:64,merge:visionzip:64,fastv:1:64"
    )
    specs += ",merge:pool:256,merge:tome:256,fastv:1:256"
    summary = vqa_eval.main(
        [
            "--results_dir",
            str(trained),
            "--model",
            encoders.TINY,
            "--limit",
            "2",
            "--max_new_tokens",
            "4",
        ]
        + [
            "--svd_ranks",
            "",
            "--nn_ranks",
            "",
            "--transforms",
            specs,
            "--out_dir",
            str(tmp_path),
            "--device",
            "cpu",
        ]
    )
    rows = {s["condition"]: s for s in summary}
    assert list(rows) == ["original"] + specs.split(",")
    assert [rows[c]["vision_tokens"] for c in specs.split(",")] == [
        32,
        32,
        64,
        64,
        64,
        64,
        256,
        256,
        256,
    ]
    per = json.loads((tmp_path / "vqa_test.json").read_text())["samples"]
    for r in per:
        assert (
            r["merge:pool:256"]["answer"]
            == r["merge:tome:256"]["answer"]
            == r["original"]["answer"]
        )
        assert r["fastv:1:256"]["answer"] == r["original"]["answer"]
    flops = [rows[c]["prefill_flops"] for c in ("merge:pool:64", "fastv:1:64", "original")]
    assert flops == sorted(flops) and len(set(flops)) == 3


def test_fastv_prunes_after_layer_k():
    """fastv on the 2-layer tiny model: the ranking attention equals eager attention's last row in
    layer K - 1; after the prefill, layer 0's cache holds every prompt token and layer 1's only the
    text and the k kept image tokens (the k best ranked); keeping all 256 answers exactly as the
    original."""
    from test_vqa import prompt_inputs
    from transformers import DynamicCache

    model, proc = vlm.load_vlm(encoders.TINY, torch.device("cpu"), torch.float32, (448, 448))
    inp = prompt_inputs(proc)
    ids, img = inp["input_ids"][0], model.config.image_token_id
    with torch.no_grad():
        V = model.model.visual(inp["pixel_values"], grid_thw=inp["image_grid_thw"])
        V = getattr(V, "pooler_output", V)
    prompt = vlm.prompt_embeds(model, ids, vlm.mrope_positions(ids, img, (16, 16)), V, None, img)
    where, n = (ids == img).nonzero().squeeze(1), len(ids)
    hooks, state = vlm.fastv_hooks(model, vlm.FastV(1, 64, where), n)
    seen = {}
    attn0 = model.model.language_model.layers[0].self_attn
    hooks.append(attn0.register_forward_hook(lambda m, a, out: seen.update(w=out[1])))
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            model(
                inputs_embeds=prompt.embeds[None],
                position_ids=prompt.positions[:, None],
                logits_to_keep=1,
            )
    finally:
        model.set_attn_implementation("sdpa")
        for h in hooks:
            h.remove()
    torch.testing.assert_close(
        state["attention"], seen["w"][0, :, -1].mean(0), rtol=1e-4, atol=1e-6
    )
    best = state["attention"][where].topk(64).indices.sort().values
    assert torch.equal(state["keep"][where].nonzero().squeeze(1), best)
    cache = DynamicCache()
    vlm.greedy(model, [prompt], 1, set(), fastv=vlm.FastV(1, 64, where), cache=cache)
    assert [layer.keys.shape[2] for layer in cache.layers] == [n, n - 256 + 64]
    full = vlm.greedy(model, [prompt], 6, set())[0]
    assert vlm.greedy(model, [prompt], 6, set(), fastv=vlm.FastV(1, 256, where))[0] == full
