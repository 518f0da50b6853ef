"""lowrank/answer_log.py: logs found by exact name, a torn tail asked again, strangers refused, the
settings that make an answer."""

import json

import pytest
from helpers import vqa_run

from lowrank import answer_log
from lowrank.cli import UserError


def test_vqa_log_torn_tail_strangers_and_reproducible_random_rule(trained, tmp_path, capsys):
    whole = vqa_run(trained, tmp_path / "a")
    log = tmp_path / "a" / "vqa_test.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    # killed while writing: the last answers are gone, torn
    log.write_text("".join(lines[:-2]) + lines[-2][:15])
    resumed = vqa_run(trained, tmp_path / "a")
    assert "cut off by an interrupted write" in capsys.readouterr().out
    assert [s["vqa_acc"] for s in resumed] == [s["vqa_acc"] for s in whole]
    again = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    first = [json.loads(line) for line in lines[1:]]

    def key(r):
        return r["sample"], r["condition"]

    # random rule too
    assert {key(r): r["answer"] for r in again} == {key(r): r["answer"] for r in first}
    other = tmp_path / "b"
    vqa_run(trained, other, "--seed", "5")
    log.write_text(
        log.read_text()
        + "".join((other / "vqa_test.jsonl").read_text().splitlines(keepends=True)[1:])
    )
    with pytest.raises(UserError, match="comes from a run with other settings"):
        vqa_run(trained, tmp_path / "a")
    log.write_text("")  # an empty log starts again
    vqa_run(trained, tmp_path / "a")


def test_vqa_settings_include_lrcp_rank_and_the_checkpoint(trained, tmp_path):
    vqa_run(trained, tmp_path)
    with pytest.raises(UserError, match="other settings"):
        vqa_run(trained, tmp_path, "--lrcp_rank", "4")


def test_answer_logs_are_found_by_exact_name_and_restart_removes_only_its_own(tmp_path):
    """exp.a and exp.b are two runs; train's torchrun logs belong to train alone."""
    names = [
        "vqa_exp.a.jsonl",
        "vqa_exp.b.jsonl",
        "vqa_train.rank0.jsonl",
        "vqa_train.rank1.jsonl",
        "vqa_tr.jsonl",
    ]
    for n in names:
        (tmp_path / n).write_text("")

    def paths(stem):
        return [p.name for p in answer_log.AnswerLog(tmp_path, stem, {}).paths()]

    assert paths("vqa_exp.a") == ["vqa_exp.a.jsonl"]
    assert paths("vqa_train") == ["vqa_train.rank0.jsonl", "vqa_train.rank1.jsonl"]
    assert paths("vqa_tr") == ["vqa_tr.jsonl"] and paths("vqa_t") == []
    answer_log.AnswerLog(tmp_path, "vqa_exp.a", {}).remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
