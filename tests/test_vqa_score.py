"""The TextVQA scorer against lmms-eval 0.7.3's own: a corpus of 855 cases built to exercise each
step of its answer processor (tests/data/make_textvqa_corpus.py), with the scores lmms-eval gave;
where lmms-eval is installed, scored again by it here. Plus the quirks written out by hand."""

import json
import sys
from pathlib import Path

import pytest

from lowrank import downstream, vqa_score

DATA = Path(__file__).resolve().parent / "data"
CORPUS = json.loads((DATA / "textvqa_corpus.json").read_text())["cases"]


def test_the_corpus_is_large_and_covers_every_match_count():
    assert len(CORPUS) >= 150
    counts = {sum(r == c["answer"] for r in c["references"]) for c in CORPUS}
    assert {0, 1, 2, 3, 4, 10} <= counts
    assert {c["score"] for c in CORPUS} >= {0.0, 0.3, 0.6, 0.9, 1.0} or len(
        {c["score"] for c in CORPUS}
    ) >= 5


def test_scores_equal_lmms_evals_on_the_corpus():
    bad = [
        (
            c["answer"],
            c["references"][:3],
            c["score"],
            vqa_score.vqa_accuracy(c["answer"], c["references"]),
        )
        for c in CORPUS
        if vqa_score.vqa_accuracy(c["answer"], c["references"]) != c["score"]
    ]
    assert not bad, f"{len(bad)} of {len(CORPUS)} differ, e.g. {bad[:5]}"
    assert all(vqa_score.normalize_answer(c["answer"]) == c["normalised"] for c in CORPUS)


def test_scores_equal_the_installed_lmms_eval():
    sys.path.insert(0, str(DATA))
    from lmms_eval_scorer import load_processor

    try:
        proc = load_processor()
    except ImportError as e:
        pytest.skip(str(e))
    from make_textvqa_corpus import cases, reference_score

    for c in cases():
        assert vqa_score.vqa_accuracy(c["answer"], c["references"]) == reference_score(
            proc, c["answer"], c["references"]
        ), c
        assert vqa_score.normalize_answer(c["answer"]) == proc(c["answer"]), c["answer"]


@pytest.mark.parametrize(
    "answer, normalised",
    [
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("youre", "you're"),
        ("oclock", "o'clock"),  # contractions restored
        ("Im", "im"),  # the table's capital-I keys never match lower-cased text
        ("red,blue", "redblue"),
        ("what?", "what"),  # ',' and '?' deleted outright, before the punctuation test
        ("it's", "it 's"),
        ("John's", "john 's"),  # "'s" split off
        ("hello-world", "hello world"),
        ("hello - world", "hello world"),  # '-' between letters: a space; by a space: gone
        ("x-y z -", "xy z"),  # one mark touching a space anywhere: deleted everywhere in the answer
        ("3.14", "3.14"),
        ("end.", "end"),
        ("e.g.", "eg"),  # periods not before a digit go
        ("." * 40 + "x", "." * 8 + "x"),  # ... at most 32 of them
        ("The two Dogs", "2 dogs"),
        ("none", "0"),  # articles dropped, number words to digits
        ("cr\rsep", "cr sep"),
        ("  padded  ", "padded"),
    ],
)
def test_quirks_by_hand(answer, normalised):
    assert vqa_score.normalize_answer(answer) == normalised


def test_leave_one_out_average_by_hand():
    refs = ["gate 7"] * 2 + ["exit"] * 8
    # 2 matches: the 2 subsets that leave a match out see 1 (1/3), the other 8 see 2 (2/3)
    assert vqa_score.vqa_accuracy("Gate 7", refs) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_score.vqa_accuracy("exit", ["exit"] * 10) == 1.0
    assert (
        vqa_score.top_answer_match("exit", refs) == 1.0
        and vqa_score.top_answer_match("gate 7", refs) == 0.0
    )


def test_answer_flips_and_mcnemar_against_scipy():
    """right -> wrong and wrong -> right counted by hand; McNemar's exact p equals scipy's two-sided
    binomial test."""
    from scipy.stats import binomtest

    acc = [1.0, 0.0, 0.3, 0.6, 1.0, 0.0]
    base = [1.0, 1.0, 0.6, 0.0, 0.0, 0.0]  # r->w: samples 1, 2; w->r: samples 3, 4
    f = downstream.flips(acc, base)
    assert (f["right_to_wrong"], f["wrong_to_right"]) == (2, 2) and f[
        "right_to_wrong_share"
    ] == 2 / 6
    for b, c in [(0, 0), (3, 0), (7, 2), (10, 11), (1, 25)]:
        want = 1.0 if b + c == 0 else binomtest(min(b, c), b + c, 0.5).pvalue
        assert abs(downstream.mcnemar_exact(b, c) - want) < 1e-12, (b, c)
