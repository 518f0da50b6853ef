"""lmms_eval_lowrank.py end to end through lmms-eval's own evaluator (offline): a local
TextVQA-schema parquet as a task YAML, the tiny full model, transforms applied where the tower's
output enters the language model."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

import lmms_eval_lowrank
from lowrank import encoders, images, lmms_model, vlm, vqa_score
from lowrank.cli import UserError

pytest.importorskip(
    "lmms_eval.evaluator", reason="lmms-eval not installed (requirements-lmms*.txt)"
)


def rows(tiny_cache, n):
    return [
        r
        for f in sorted((tiny_cache / "data").rglob("*.parquet"))
        for r in pq.read_table(f).to_pylist()
    ][:n]


# every family: (the model built in code, its image's tokens at 448 x 448)
FAMILIES = [(encoders.TINY, 256), ("tiny-random-qwen2-vl", 256), ("tiny-random-qwen3-vl", 196)]


@pytest.mark.parametrize("model,tokens", FAMILIES)
def test_transforms_through_lmms_evals_evaluator(tiny_cache, tmp_path, model, tokens):
    report = lmms_eval_lowrank.main(
        [
            "--model",
            model,
            "--parquet_dir",
            str(tiny_cache / "data"),
            "--limit",
            "3",
            "--transforms",
            f"original,svd:{tokens},zeros,keep:leverage:32",
            "--device",
            "cpu",
            "--out_dir",
            str(tmp_path),
        ]
    )
    got = {name: r["answers"]["textvqa_local"] for name, r in report.items()}
    assert got[f"svd:{tokens}"] == got["original"] and got["zeros"] != got["original"]
    saved = json.loads((tmp_path / "lmms_eval.json").read_text())
    assert saved["transforms"]["zeros"]["answers"] == report["zeros"]["answers"]
    # the original transform answers as the unmodified model does
    assert got["original"] == unmodified_answers(tiny_cache, 3, model)


def unmodified_answers(tiny_cache, n, name=encoders.TINY):
    """The model's own generate() on lmms-eval's TextVQA prompt and image, for the first n rows."""
    model, proc = vlm.load_vlm(name, torch.device("cpu"), torch.float32, (448, 448))
    out = []
    for row in rows(tiny_cache, n):
        text = row["question"].capitalize() + "\nAnswer the question using a single word or phrase."
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        image = images.load_image(row["image"]["bytes"], (448, 448))
        inputs = proc(text=[prompt], images=[image], return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=16, do_sample=False)[
            0, inputs["input_ids"].shape[1] :
        ]
        want = proc.tokenizer.decode(
            [t for t in ids.tolist() if t < len(proc.tokenizer)], skip_special_tokens=True
        )
        out.append(want.strip().split("ASSISTANT:")[0])
    return out


def test_lmms_evals_own_command_line_loads_the_model(tiny_cache, tmp_path):
    """`python -m lmms_eval --model lowrank_qwen` (the entry point pyproject.toml registers; `pip
    install --no-deps -e .`): lmms-eval's own results and per-sample log; full-rank SVD answers as
    the unmodified model does."""
    from importlib.metadata import entry_points

    assert any(e.name == "lowrank_qwen" for e in entry_points(group="lmms_eval.models")), (
        "the model is registered by installing the project: pip install --no-deps -e ."
    )
    task = tmp_path / "task"
    task.mkdir()
    lmms_eval_lowrank.local_task(tiny_cache / "data", task)
    args = "pretrained=tiny-random,transform=svd:256,image_size=448"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "lowrank_qwen", "--model_args", args]
    cmd += ["--tasks", "textvqa_local", "--include_path", str(task), "--limit", "2"]
    cmd += ["--output_path", str(tmp_path / "out"), "--log_samples", "--device", "cpu"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("*_results.json")).read_text())
    assert "exact_match,none" in results["results"]["textvqa_local"]
    log = next((tmp_path / "out").rglob("*_samples_textvqa_local.jsonl")).read_text().splitlines()
    samples = sorted((json.loads(line) for line in log), key=lambda s: s["doc_id"])
    assert [s["filtered_resps"] for s in samples] == unmodified_answers(tiny_cache, 2)


def test_lmms_evals_score_equals_ours_on_the_same_answers(tiny_cache, tmp_path, monkeypatch):
    docs = rows(tiny_cache, 6)
    # some right
    answers = [d["answer"][0] if k % 2 == 0 else "nothing like it" for k, d in enumerate(docs)]

    def fixed(self, requests):
        return [answers[req.args[3]] for req in requests]

    monkeypatch.setattr(lmms_model.LowRankQwen, "generate_until", fixed)
    report = lmms_eval_lowrank.main(
        [
            "--model",
            encoders.TINY,
            "--parquet_dir",
            str(tiny_cache / "data"),
            "--limit",
            "6",
            "--device",
            "cpu",
            "--out_dir",
            str(tmp_path),
        ]
    )
    theirs = report["original"]["results"]["textvqa_local"]["exact_match,none"]
    ours = sum(vqa_score.vqa_accuracy(a, d["answer"]) for a, d in zip(answers, docs)) / len(docs)
    assert theirs == pytest.approx(ours) and 0 < ours < 1


def test_finished_transforms_are_kept_and_a_rerun_resumes(tiny_cache, tmp_path, capsys):
    argv = [
        "--model",
        encoders.TINY,
        "--parquet_dir",
        str(tiny_cache / "data"),
        "--limit",
        "2",
        "--device",
        "cpu",
    ]
    argv += ["--out_dir", str(tmp_path)]
    first = lmms_eval_lowrank.main(argv + ["--transforms", "original,zeros"])
    assert set(json.loads((tmp_path / "lmms_eval.json").read_text())["transforms"]) == {
        "original",
        "zeros",
    }
    capsys.readouterr()
    again = lmms_eval_lowrank.main(argv + ["--transforms", "original,zeros,svd:256"])
    out = capsys.readouterr().out
    assert (
        "2 transforms already in" in out
        and "== transform original" not in out
        and "== transform svd:256" in out
    )
    assert again["zeros"] == first["zeros"] and list(again) == ["original", "zeros", "svd:256"]


def test_lmms_eval_inputs_are_checked_before_the_model_loads(
    tiny_cache, trained, tmp_path, monkeypatch
):
    pytest.importorskip("lmms_eval")

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(lmms_eval_lowrank, "LowRankQwen", no_model)
    base = ["--model", "tiny-random", "--device", "cpu", "--out_dir", str(tmp_path / "o")]
    data = ["--parquet_dir", str(tiny_cache / "data")]
    for extra, msg in (
        (["--transforms", "svd:99999"] + data, "a rank must be between 1"),
        (["--transforms", "svd:-1"] + data, "a rank must be between 1"),
        (["--transforms", "keep:norm:99999"] + data, "a rank must be between 1"),
        (["--transforms", "merge:tome:0"] + data, "a rank must be between 1"),
        (["--transforms", ""] + data, "--transforms is empty"),
        (["--transforms", "nn:64", "--results_dir", str(trained)] + data, "serves ranks 1..16"),
        (["--tasks", "no_such_task"], "not an lmms-eval task"),
        (["--parquet_dir", str(tmp_path)], "no TextVQA-schema parquet rows"),
    ):
        with pytest.raises(UserError, match=msg):
            lmms_eval_lowrank.main(base + extra)
    out = tmp_path / "o"
    out.mkdir(exist_ok=True)
    (out / "lmms_eval.json").write_text(
        json.dumps({"settings": {"model": "another"}, "transforms": {}})
    )
    with pytest.raises(UserError, match="holds the results of a run with other settings"):
        lmms_eval_lowrank.main(base + data + ["--transforms", "original"])
    # not replaced
    assert json.loads((out / "lmms_eval.json").read_text())["settings"] == {"model": "another"}
