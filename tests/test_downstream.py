"""lowrank/downstream.py: scoring by hand: samples without answers, consistency, bootstrap
intervals."""

import numpy as np
import pytest

from lowrank import downstream, transforms
from lowrank.feature_cache import SampleRecord

COST = dict(
    vision_tokens=256, prompt_tokens=300, prefill_flops=1e9, kv_bytes=1e6, batch=2, transform_ms=0.1
)
COST.update(prefill_ms=5.0, decode_ms=1.0, generate_ms=9.0, peak_mib=None, tower_ms=3.0)


def test_a_sample_without_answers_is_left_out_of_the_accuracy():
    conds = [transforms.Spec("original"), transforms.Spec("zeros")]
    samples = {0: SampleRecord(question="q", answers=("a",) * 10), 1: SampleRecord(question="q")}
    done = {
        (i, str(c)): {"answer": "a" if c.kind == "original" else "b", **COST}
        for i in (0, 1)
        for c in conds
    }
    _, summary = downstream.score([0, 1], conds, done, samples)
    assert summary[0]["vqa_acc"] == 1.0 and summary[1]["vqa_acc"] == 0.0
    assert summary[0]["n"] == 1 and summary[0]["n_without_answers"] == 1
    assert summary[0]["ms_per_sample"] == 0.1 + 9.0 / 2 and summary[0]["prefill_flops"] == 1e9


def test_consistency_and_bootstrap_intervals_by_hand():
    conds = [transforms.Spec("original"), transforms.Spec("zeros")]
    samples = {i: SampleRecord(question="q", answers=("yes",) * 10) for i in range(4)}
    # (original, zeros)
    said = {0: ("Yes", "yes."), 1: ("yes", "no"), 2: ("no", "No"), 3: ("no", "yes")}
    done = {
        (i, str(c)): {"answer": said[i][k], **COST} for i in range(4) for k, c in enumerate(conds)
    }
    _, (orig, zeros) = downstream.score(list(range(4)), conds, done, samples)
    assert orig["consistency"] == 1.0 and zeros["consistency"] == 0.5  # "yes." ~ "Yes", "No" ~ "no"
    assert zeros["consistency_se"] == pytest.approx(np.std([1, 0, 1, 0], ddof=1) / 2)
    assert orig["vqa_acc"] == 0.5 and zeros["vqa_acc"] == 0.5 and zeros["changed"] == 1.0
    lo, hi = zeros["vqa_acc_ci95"]
    assert 0 <= lo <= 0.5 <= hi <= 1 and orig["delta_ci95"] == [0.0, 0.0]
