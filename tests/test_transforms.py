"""transforms.py: spec strings round-trip and are refused in one line; each transform against an
independent computation on real tiny-tower features."""

import pytest
import torch

from lowrank import feature_cache, feature_codecs, merging, metrics, selection, transforms
from lowrank.cli import UserError
from qwenvl_dataloader import FeatureDataset  # the seed's import path, kept for users


@pytest.mark.parametrize(
    "text",
    [
        "original",
        "zeros",
        "svd:64",
        "nn:16",
        "keep:leverage:32",
        "keep:random:8",
        "codec:int8",
        "codec:pca_int8:64",
        "codec:svd_fp16:32",
        "pixelprune",
        "pixelprune:8",
    ],
)
def test_specs_round_trip(text):
    assert str(transforms.parse_spec(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "svd",
        "svd:x",
        "keep:nope:3",
        "codec:zip:4",
        "nn:1:2",
        "original:3",
        "",
        "pixelprune:300",
        "pixelprune:x",
    ],
)
def test_bad_specs_are_one_line(text):
    with pytest.raises(UserError, match="transform .*expected original, zeros, svd"):
        transforms.parse_spec(text)


def test_spec_limits():
    check = transforms.check_spec
    with pytest.raises(UserError, match="a rank must be between 1 and"):
        check(transforms.parse_spec("svd:300"), 256, 2048)
    with pytest.raises(UserError, match="serves ranks 1..16"):
        check(transforms.parse_spec("nn:32"), 256, 2048, nn_rank=16)
    with pytest.raises(UserError, match="serves only its trained rank 16"):
        check(transforms.parse_spec("nn:8"), 256, 2048, nn_rank=16, nested=False)
    with pytest.raises(UserError, match="needs a rank"):
        check(transforms.parse_spec("codec:pca_int8"), 256, 2048)
    with pytest.raises(UserError, match="no omega basis"):
        check(transforms.parse_spec("codec:omega_int8:8"), 256, 2048)


def test_each_transform_against_an_independent_computation(tiny_cache):
    # the tower's scale, as vqa_eval gets it
    X = FeatureDataset(tiny_cache / "cache", [0], "none")[0][0]
    Xn = feature_cache.normalize(X)
    P = metrics.principal_directions([Xn[None]]).float()
    setup = transforms.TokenSetup("layernorm", (16, 16), bases={"pca": P}, max_svd=64)
    tower = transforms.Tower(X, setup)

    def back(Xh):
        return feature_cache.denormalize(Xh, X)

    assert torch.equal(tower.apply(transforms.Spec("original")).tokens, X)
    assert not tower.apply(transforms.Spec("zeros")).tokens.any()
    for r in (8, 64, 128):  # 128 is above the shared SVD's rank: computed on its own
        got = tower.apply(transforms.parse_spec(f"svd:{r}")).tokens
        torch.testing.assert_close(
            got, back(metrics.svd_reconstruct(Xn[None], r, "svd")[0]), atol=1e-4, rtol=1e-4
        )
    full = tower.apply(transforms.parse_spec("svd:256")).tokens
    torch.testing.assert_close(full, X, atol=1e-3, rtol=1e-4)
    out = tower.apply(transforms.parse_spec("keep:norm:32"))
    assert torch.equal(out.kept, selection.select("norm", Xn, 32).sort().values)
    assert torch.equal(out.tokens, X[out.kept]) and out.deepstack is None
    spec = transforms.parse_spec("codec:pca_int8:64")
    payload = feature_codecs.encode("pca_int8", Xn, 64, P)
    torch.testing.assert_close(
        tower.apply(spec).tokens, back(feature_codecs.decode("pca_int8", payload, P))
    )


def test_deepstack_features_follow_every_transform(tiny_cache):
    """Qwen3-VL's deepstack levels go where the tokens go: the kept rows, the same merge weights,
    zeros; under svd each level is its least-squares fit on the tokens' own left singular vectors
    (an orthogonal projection onto them, computed here apart); a per-image codec codes each level
    alone; a data-set basis is refused."""
    X = FeatureDataset(tiny_cache / "cache", [0], "none")[0][0].float()
    g = torch.Generator().manual_seed(0)
    ds = torch.stack([X.flip(0) * 0.5 + 1, torch.randn(X.shape, generator=g) * 2])
    tower = transforms.Tower(X, transforms.TokenSetup("layernorm", (16, 16)), deepstack=ds)
    assert torch.equal(tower.apply(transforms.Spec("original")).deepstack, ds)
    assert not tower.apply(transforms.Spec("zeros")).deepstack.any()
    out = tower.apply(transforms.parse_spec("keep:norm:32"))
    assert torch.equal(out.deepstack, ds[:, out.kept])
    out = tower.apply(transforms.parse_spec("merge:pool:64"))
    W, _ = merging.merge("pool", feature_cache.normalize(X), 64, (16, 16))
    torch.testing.assert_close(out.deepstack, (W @ ds.double()).float())
    U = torch.linalg.svd(feature_cache.normalize(X).double(), full_matrices=False)[0][:, :16]
    got = tower.apply(transforms.parse_spec("svd:16")).deepstack
    for level, Y in zip(got, ds):
        Yn = feature_cache.normalize(Y).double()
        want = feature_cache.denormalize((U @ (U.T @ Yn)).float(), Y)
        torch.testing.assert_close(level, want, atol=1e-4, rtol=1e-4)
    full = tower.apply(transforms.parse_spec("svd:256")).deepstack  # A spans every token: exact
    torch.testing.assert_close(full, ds, atol=1e-3, rtol=1e-4)
    got = tower.apply(transforms.parse_spec("codec:int8")).deepstack
    for level, Y in zip(got, ds):
        Yn = feature_cache.normalize(Y)
        coded = feature_codecs.decode("int8", feature_codecs.encode("int8", Yn, None, None), None)
        torch.testing.assert_close(level, feature_cache.denormalize(coded, Y))
    with pytest.raises(UserError, match="its basis is fit to the merger's output"):
        tower.apply(transforms.parse_spec("codec:pca_int8:8"))
    sizes = [
        transforms.stored_bytes(transforms.parse_spec(s), 256, 64, "none", 2, levels=3)
        for s in ("original", "svd:8", "keep:norm:32")
    ]
    assert sizes == [3 * 256 * 64 * 2, 8 * (256 + 3 * 64) * 2, 3 * 32 * 64 * 2 + 2 * 32]
