"""transforms.py: spec strings round-trip and are refused in one line; each transform against an
independent computation on real tiny-tower features."""

import pytest
import torch

from lowrank import feature_cache, feature_codecs, metrics, selection, transforms
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
    ],
)
def test_specs_round_trip(text):
    assert str(transforms.parse_spec(text)) == text


@pytest.mark.parametrize(
    "text", ["svd", "svd:x", "keep:nope:3", "codec:zip:4", "nn:1:2", "original:3", ""]
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
    tower = transforms.Tower(X, "layernorm", (16, 16), bases={"pca": P}, max_svd=64)
    back = lambda Xh: feature_cache.denormalize(Xh, X)  # noqa: E731
    assert torch.equal(tower.apply(transforms.Spec("original"))[0], X)
    assert not tower.apply(transforms.Spec("zeros"))[0].any()
    for r in (8, 64, 128):  # 128 is above the shared SVD's rank: computed on its own
        got = tower.apply(transforms.parse_spec(f"svd:{r}"))[0]
        torch.testing.assert_close(
            got, back(metrics.svd_reconstruct(Xn[None], r, "svd")[0]), atol=1e-4, rtol=1e-4
        )
    full = tower.apply(transforms.parse_spec("svd:256"))[0]
    torch.testing.assert_close(full, X, atol=1e-3, rtol=1e-4)
    tokens, kept = tower.apply(transforms.parse_spec("keep:norm:32"))
    assert torch.equal(kept, selection.select("norm", Xn, 32).sort().values) and torch.equal(
        tokens, X[kept]
    )
    spec = transforms.parse_spec("codec:pca_int8:64")
    payload = feature_codecs.encode("pca_int8", Xn, 64, P)
    torch.testing.assert_close(
        tower.apply(spec)[0], back(feature_codecs.decode("pca_int8", payload, P))
    )
