"""lowrank/model.py: a checkpoint whose config cannot build a model is refused before allocating."""

import pytest
import torch

from lowrank import model
from lowrank.cli import UserError


def test_an_absurd_checkpoint_config_is_refused_before_allocating(trained, tmp_path):
    ck = torch.load(trained / "best_model.pt", weights_only=True)
    for change in (
        {"rank": 200000},
        {"dim": "2048"},
        {"arch_options": {"oversample": "x"}},
        {"arch": 3},
    ):
        bad = dict(ck, config=dict(ck["config"], **change))
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(UserError, match="do not build a model"):
            model.load_checkpoint(tmp_path / "bad.pt")
