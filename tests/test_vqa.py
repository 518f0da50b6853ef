"""vqa_eval.py on the tiny full Qwen2.5-VL (offline): the scoring, the M-RoPE positions, the
decoding loop against the model's own generate, the hook really acting, full-rank identity, and
resuming."""

import inspect
import json

import pytest
import torch

import vqa_eval
from lowrank import (
    demo_set,
    downstream,
    encoders,
    feature_cache,
    feature_codecs,
    images,
    lm_cost,
    runs,
    transforms,
    vlm,
    vqa_score,
)
from lowrank.cli import UserError


def test_vqa_accuracy_partial_credit_by_hand():
    """min(#matching others / 3, 1) averaged over the 10 leave-one-out subsets."""

    def refs(n):
        return ["gate 7"] * n + ["exit"] * (10 - n)

    # n matches: the n subsets that leave a match out see n-1, the other 10-n see n
    for n, want in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        hand = (n * min((n - 1) / 3, 1) + (10 - n) * min(n / 3, 1)) / 10 if n else 0.0
        assert (
            vqa_score.vqa_accuracy("gate 7", refs(n)) == pytest.approx(hand) == pytest.approx(want)
        )
    assert vqa_score.vqa_accuracy("exit", refs(3)) == 1.0


@pytest.mark.parametrize(
    "answer,ref",
    [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("A Dog!", "dog"),
        ("coca-cola", "coca cola"),
        ("1,000", "1000"),
        ("  yes\n", "yes"),
        ("3.5", "3.5"),
        ("ten", "10"),
        ("hello, world", "hello world"),
    ],
)
def test_answer_normalisation(answer, ref):
    assert vqa_score.normalize_answer(answer) == vqa_score.normalize_answer(ref)
    assert vqa_score.vqa_accuracy(answer, [ref] * 10) == 1.0


def test_normalisation_keeps_what_matters():
    assert vqa_score.normalize_answer("3.5") == "3.5" and vqa_score.normalize_answer(
        "3.5"
    ) != vqa_score.normalize_answer("35")
    assert vqa_score.normalize_answer("gate 7") != vqa_score.normalize_answer("gate 8")
    assert vqa_score.vqa_accuracy("", ["yes"] * 10) == 0.0


def test_top_answer_match_is_against_the_most_common_answer():
    refs = ["bank"] * 6 + ["the bank"] * 2 + ["bnak"] * 2
    assert (
        vqa_score.top_answer_match("Bank", refs) == 1.0
        and vqa_score.top_answer_match("bnak", refs) == 0.0
    )
    assert vqa_score.vqa_accuracy("bnak", refs) == pytest.approx(0.6)


# the model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vlm():
    model, proc = vlm.load_vlm(encoders.TINY, torch.device("cpu"), torch.float32, (448, 448))
    return model, proc


def prompt_inputs(proc, question="what is written on the sign?", seed=0):
    row = demo_set.make_rows(1, seed=seed)[0]
    image = images.load_image(row["image"]["bytes"], (448, 448))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return proc(text=[text], images=[image], return_tensors="pt")


def test_tiny_model_tower_is_the_tiny_encoder(tiny_vlm):
    """The tiny full model's vision tower gives exactly the tiny-random encoder's features (what a
    cache holds)."""
    model, proc = tiny_vlm

    enc = encoders.Encoder(encoders.TINY, "cpu")
    image = images.load_image(demo_set.make_rows(1, seed=0)[0]["image"]["bytes"], (448, 448))
    inp = enc.processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.model.visual(inp["pixel_values"], grid_thw=inp["image_grid_thw"])
    torch.testing.assert_close(getattr(out, "pooler_output", out), enc([image])[0], rtol=0, atol=0)


def test_mrope_positions_equal_the_models_own(tiny_vlm):
    model, proc = tiny_vlm
    inp = prompt_inputs(proc)
    ids = inp["input_ids"]
    assert (ids == model.config.image_token_id).sum() == 256
    params = inspect.signature(model.model.get_rope_index).parameters
    kw = dict(image_grid_thw=inp["image_grid_thw"], attention_mask=inp["attention_mask"])
    if "mm_token_type_ids" in params:  # transformers 5.x
        kw["mm_token_type_ids"] = inp["mm_token_type_ids"]
    ref, _ = model.model.get_rope_index(ids, **kw)
    assert torch.equal(
        vlm.mrope_positions(ids[0], model.config.image_token_id, (16, 16)), ref[:, 0]
    )


def test_greedy_loop_equals_generate(tiny_vlm):
    """Our decoding from inputs_embeds + explicit M-RoPE positions gives the tokens of the model's
    own generate()."""
    model, proc = tiny_vlm
    inp = prompt_inputs(proc)
    ids = inp["input_ids"][0]
    with torch.no_grad():
        ref = model.generate(**inp, max_new_tokens=6, do_sample=False)[0, len(ids) :].tolist()
        Vt = model.model.visual(inp["pixel_values"], grid_thw=inp["image_grid_thw"])
        Vt = getattr(Vt, "pooler_output", Vt)
    pos = vlm.mrope_positions(ids, model.config.image_token_id, (16, 16))
    prompt = vlm.prompt_embeds(model, ids, pos, Vt, None, model.config.image_token_id)
    _, toks = vlm.answer(model, proc, prompt, 6, set())
    assert toks == ref


def test_keeping_every_token_is_the_original(tiny_vlm):
    """The kept-token path with all 256 tokens kept (in order) answers exactly as the original."""
    model, proc = tiny_vlm
    inp = prompt_inputs(proc)
    ids = inp["input_ids"][0]
    with torch.no_grad():
        Vt = model.model.visual(inp["pixel_values"], grid_thw=inp["image_grid_thw"])
        Vt = getattr(Vt, "pooler_output", Vt)
    pos = vlm.mrope_positions(ids, model.config.image_token_id, (16, 16))
    img = model.config.image_token_id

    def answer(V, kept):
        prompt = vlm.prompt_embeds(model, ids, pos, V, kept, img)
        return vlm.answer(model, proc, prompt, 6, set())[1]

    full = answer(Vt, None)
    kept = torch.arange(256)
    assert answer(Vt[kept], kept) == full
    half = torch.arange(0, 256, 2)  # dropping tokens changes what the model sees
    assert answer(Vt[half], half) != full


# the CLI -----------------------------------------------------------------------------------------


def run(trained, tmp_path, *extra):
    return vqa_eval.main(
        [
            "--results_dir",
            str(trained),
            "--model",
            encoders.TINY,
            "--limit",
            "2",
            "--max_new_tokens",
            "5",
            "--out_dir",
            str(tmp_path),
            "--device",
            "cpu",
            *extra,
        ]
    )


def test_full_rank_is_identical_and_zeros_change_the_answers(trained, tmp_path, capsys):
    """At full rank (256) the SVD reconstruction generates exactly the original tokens; zeroed
    vision tokens change the answers (the replacement really acts); outputs are written per sample
    and per condition."""
    summary = run(
        trained,
        tmp_path,
        "--svd_ranks",
        "8,256",
        "--nn_ranks",
        "16",
        "--zeros",
        "--rules",
        "leverage",
        "--keep",
        "32",
    )
    out = capsys.readouterr().out
    rows = {s["condition"]: s for s in summary}
    assert list(rows) == ["original", "zeros", "svd:8", "svd:256", "nn:16", "keep:leverage:32"]
    log = [json.loads(l) for l in (tmp_path / "vqa_test.jsonl").read_text().splitlines()[1:]]
    toks = {(r["sample"], r["condition"]): r["tokens"] for r in log}
    samples = sorted({r["sample"] for r in log})
    assert len(samples) == 2 and len(log) == 12
    for i in samples:
        assert toks[i, "svd:256"] == toks[i, "original"]
    assert rows["svd:256"]["changed"] == 0.0 and rows["zeros"]["changed"] == 1.0
    assert any(toks[i, "zeros"] != toks[i, "original"] for i in samples)
    d = json.loads((tmp_path / "vqa_test.json").read_text())
    assert d["settings"]["model"] == encoders.TINY and len(d["samples"]) == 2
    s0 = d["samples"][0]
    assert s0["question"] and len(s0["answers"]) == 10 and "answer" in s0["original"]
    assert s0["original"]["vqa_acc"] == vqa_score.vqa_accuracy(
        s0["original"]["answer"], s0["answers"]
    )
    assert (tmp_path / "vqa_test.csv").read_text().count("\n") == 3 and (
        tmp_path / "vqa_test.png"
    ).stat().st_size > 0
    assert "mean nothing" in out and "VQA acc" in out


def test_resume_asks_nothing_already_answered(trained, tmp_path, monkeypatch):
    """Interrupted after 3 answers (batch 1), the rerun asks only the 3 missing ones; a third run
    asks none."""
    calls = []
    real = vlm.greedy

    def counting(model, prompts, *a, **k):
        calls.extend(prompts)
        if len(calls) == 4 and not getattr(counting, "resumed", False):
            raise KeyboardInterrupt  # the user's Ctrl-C
        return real(model, prompts, *a, **k)

    monkeypatch.setattr(downstream, "greedy", counting)
    args = ("--svd_ranks", "8", "--nn_ranks", "", "--zeros", "--batch_size", "1")
    with pytest.raises(KeyboardInterrupt):
        run(trained, tmp_path, *args)
    assert len((tmp_path / "vqa_test.jsonl").read_text().splitlines()) == 1 + 3
    counting.resumed, calls[:] = True, []
    run(trained, tmp_path, *args)
    assert len(calls) == 3  # 2 samples x 3 conditions - 3 done
    calls[:] = []
    summary = run(trained, tmp_path, *args)
    assert calls == [] and [s["n"] for s in summary] == [2, 2, 2]
    # another prompt: not mixed into the same file
    with pytest.raises(UserError, match="other settings"):
        run(trained, tmp_path, "--svd_ranks", "8", "--nn_ranks", "", "--prompt", "{question}?")


def test_a_batch_killed_halfway_leaves_none_of_its_answers(trained, tmp_path, monkeypatch):
    """Batches of 3 samples: killed inside the second condition's decoding, the log holds the first
    condition's 3 answers and nothing of the second; the rerun's answers equal an uninterrupted
    run's."""
    real, calls = vlm.greedy, []

    def dying(model, prompts, *a, **k):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, prompts, *a, **k)

    monkeypatch.setattr(downstream, "greedy", dying)
    args = ("--svd_ranks", "8", "--nn_ranks", "", "--batch_size", "3", "--limit", "3")
    with pytest.raises(KeyboardInterrupt):
        run(trained, tmp_path / "a", *args)
    log = [json.loads(l) for l in (tmp_path / "a" / "vqa_test.jsonl").read_text().splitlines()[1:]]
    assert calls[0] == 3 and [r["condition"] for r in log] == ["original"] * 3
    monkeypatch.setattr(downstream, "greedy", real)
    run(trained, tmp_path / "a", *args)
    run(trained, tmp_path / "b", *args)

    def answers(d):
        return {
            (r["sample"], c): r[c]["answer"] for r in d["samples"] for c in ("original", "svd:8")
        }

    a, b = (json.loads((tmp_path / d / "vqa_test.json").read_text()) for d in "ab")
    assert len(answers(a)) == 6 and answers(a) == answers(b)


def test_wrong_model_for_the_cache_is_refused(trained, tmp_path):
    with pytest.raises(UserError, match="holds features of tiny-random"):
        vqa_eval.main(
            ["--results_dir", str(trained), "--model", "random-3b", "--out_dir", str(tmp_path)]
        )


def test_checkpoint_directory_path(tiny_vlm, tmp_path):
    """The path a real checkpoint takes (config.json, weights, tokenizer with its chat template,
    preprocessor config): the tiny model saved to a directory loads through it and answers exactly
    as the model built in code."""
    model, proc = tiny_vlm
    model.save_pretrained(tmp_path)
    proc.tokenizer.chat_template = vlm.CHAT_TEMPLATE
    proc.tokenizer.save_pretrained(tmp_path)
    proc.image_processor.save_pretrained(tmp_path)
    loaded, lproc = vlm.load_vlm(str(tmp_path), torch.device("cpu"), torch.float32, (448, 448))
    inp, linp = prompt_inputs(proc), prompt_inputs(lproc)
    assert torch.equal(inp["input_ids"], linp["input_ids"])
    torch.testing.assert_close(inp["pixel_values"], linp["pixel_values"], rtol=0, atol=0)
    with torch.no_grad():
        a = model.generate(**inp, max_new_tokens=4, do_sample=False)
        b = loaded.generate(**linp, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)


def test_random_3b_has_the_published_size():
    """random-3b, the real-size full model for GPU timing, has Qwen2.5-VL-3B's 3,754,622,976
    parameters, its tower the random-3b encoder's 668,684,288 (built on the meta device: no
    memory)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        m = Qwen2_5_VLForConditionalGeneration._from_config(
            vlm.random_config(encoders.RANDOM_3B, vlm.tiny_tokenizer())
        )
    assert sum(p.numel() for p in m.parameters()) == 3_754_622_976
    with torch.device("meta"):
        tower = encoders.random_tower(encoders.RANDOM_3B)[0]
    assert (
        sum(p.numel() for p in m.model.visual.parameters())
        == sum(p.numel() for p in tower.parameters())
        == 668_684_288
    )


def test_another_data_set_is_refused(trained, tmp_path):
    """--dataset_dir pointing at other images (same schema, same count) is refused before anything
    is asked: the questions and features belong to the cache's images (per-sample fingerprints)."""

    other = tmp_path / "other"
    demo_set.write_parquet(demo_set.make_rows(40, seed=11), other / "data", shards=2)
    with pytest.raises(UserError, match="holds another image than the one the cache"):
        run(trained, tmp_path, "--dataset_dir", str(other), "--svd_ranks", "8", "--nn_ranks", "")
    # the header only: nothing asked
    assert len((tmp_path / "vqa_test.jsonl").read_text().splitlines()) == 1


def test_report_aggregates_by_hand(trained, tmp_path, monkeypatch):
    """With answers fixed by hand (original: the most common reference for the first sample, a wrong
    word for the second; svd:8: wrong for both), the table's accuracy, paired change and its
    standard error, top-answer match and share changed are what they must be."""
    import numpy as np

    samples = json.loads((trained / "split.json").read_text())["test"][:2]
    manifest = feature_cache.read_manifest(
        json.loads((trained / "config.json").read_text())["cache_dir"]
    )["samples"]
    refs = [manifest[str(i)]["answers"] for i in samples]
    best = max(set(refs[0]), key=refs[0].count)
    calls = iter(range(100))

    def by_condition(model, prompts, *a, **k):  # one batch per condition: original, then svd:8
        toks = [[0], [1]] if next(calls) == 0 else [[1], [1]]
        return toks, {"prefill_s": 0.0, "decode_s": None, "total_s": 0.0}

    monkeypatch.setattr(downstream, "greedy", by_condition)
    monkeypatch.setattr(
        downstream,
        "decode_answer",
        lambda proc, toks: best.upper() + "." if toks == [0] else "wrong",
    )
    summary = {
        s["condition"]: s for s in run(trained, tmp_path, "--svd_ranks", "8", "--nn_ranks", "")
    }
    acc0 = vqa_score.vqa_accuracy(best, refs[0])
    assert acc0 > 0 and vqa_score.vqa_accuracy("wrong", refs[1]) == 0
    assert summary["original"]["vqa_acc"] == pytest.approx(acc0 / 2)
    assert summary["original"]["top_answer"] == 0.5 and summary["original"]["changed"] == 0.0
    s = summary["svd:8"]
    assert s["vqa_acc"] == 0.0 and s["delta"] == pytest.approx(-acc0 / 2)
    assert (
        s["delta_se"] == pytest.approx(np.std([-acc0, 0.0], ddof=1) / np.sqrt(2))
        and s["delta_se"] > 0
    )
    assert s["top_answer"] == 0.0 and s["changed"] == 0.5


def test_transform_specs_on_the_command_line(trained, tmp_path):
    """--transforms adds any condition by its spec; each reads the same in the outputs; a codec
    condition runs."""
    summary = run(
        trained,
        tmp_path,
        "--svd_ranks",
        "",
        "--nn_ranks",
        "",
        "--transforms",
        "codec:pca_int8:64,keep:norm:16,svd:256,codec:fp16",
    )
    names = [s["condition"] for s in summary]
    assert names == ["original", "codec:pca_int8:64", "keep:norm:16", "svd:256", "codec:fp16"]
    per = json.loads((tmp_path / "vqa_test.json").read_text())["samples"]
    for r in per:  # full rank and fp16 storage keep the answer of the original tokens
        assert r["svd:256"]["answer"] == r["original"]["answer"] == r["codec:fp16"]["answer"]
    with pytest.raises(UserError, match="transform 'svd:x'"):
        run(trained, tmp_path / "b", "--transforms", "svd:x")


def test_resize_is_the_image_at_another_resolution_through_the_same_model(trained, tmp_path):
    """resize:448 is the image at the cache's own size: the original answers, token for token;
    resize:224 runs the tower on a 224 px image: 64 vision tokens (8 x 8 cells of 28 px), fewer
    prefill FLOPs, its own tower time, and the bytes of 64 tokens; the ViT's tail refuses it."""
    summary = run(
        trained,
        tmp_path,
        "--svd_ranks",
        "",
        "--nn_ranks",
        "",
        "--transforms",
        "resize:448,resize:224,keep:norm:64",
    )
    by = {s["condition"]: s for s in summary}
    assert list(by) == ["original", "resize:448", "resize:224", "keep:norm:64"]
    per = json.loads((tmp_path / "vqa_test.json").read_text())["samples"]
    assert all(r["resize:448"]["answer"] == r["original"]["answer"] for r in per)
    assert by["resize:224"]["vision_tokens"] == by["keep:norm:64"]["vision_tokens"] == 64
    assert by["resize:448"]["vision_tokens"] == 256
    assert by["resize:224"]["prefill_flops"] < by["original"]["prefill_flops"]
    # the tower: the resized image's own (a quarter of the patches); the others, the original's
    assert (
        by["keep:norm:64"]["tower_flops"]
        == by["resize:448"]["tower_flops"]
        == by["original"]["tower_flops"]
    )
    assert by["resize:224"]["tower_flops"] < by["original"]["tower_flops"] / 3
    for r in by.values():
        assert (
            r["total_flops"] == r["tower_flops"] + r["prefill_flops"] and 0 < r["tower_share"] < 1
        )
    assert by["resize:224"]["share"] == by["keep:norm:64"]["share"] == 0.25
    assert by["resize:224"]["bytes_per_image"] == 64 * 2048 * 4  # float32 on CPU
    log = [json.loads(line) for line in (tmp_path / "vqa_test.jsonl").read_text().splitlines()]
    assert all(r["tower_ms"] > 0 for r in log[1:] if r["condition"] == "resize:224")
    with pytest.raises(UserError, match="transform 'resize:0'"):
        run(trained, tmp_path / "b", "--transforms", "resize:0")


# ----------------------------------------------------------------------------------------------
# batches and the cost

QUESTIONS = [
    "what?",
    "what is written on the sign in this photo, in capitals?",
    "colour",
    "who is at the back",
]
KINDS = [
    "original",
    "zeros",
    "svd:8",
    "nn:16",
    "keep:leverage:32",
    "keep:random:16",
    "keep:lrcp:64",
    "codec:pca_int8:32",
]


def test_batched_answers_equal_batch_one(trained, tiny_vlm):
    """Every condition kind, 4 questions of different lengths: the answers of one batch of 4 (and of
    3 + 1) equal the answers asked one sample at a time, token for token, and the batches had mixed
    prompt lengths."""

    model, proc = tiny_vlm
    cfg, split = runs.read_run(trained)
    nn_model = runs.load_run(trained).model
    conds = [transforms.parse_spec(t) for t in KINDS]
    bases = downstream.fit_bases(
        conds, 8, trained, cfg.cache_dir, split["train"], cfg.normalization
    )
    setup = transforms.TokenSetup("layernorm", (16, 16), nn_model, bases, max_svd=8)
    asker = downstream.Asker(model, proc, torch.float32, setup, downstream.Decoding(str, 6))

    rows = demo_set.make_rows(4, seed=5)
    items = [
        downstream.Item(i, images.load_image(r["image"]["bytes"], (448, 448)), q, conds)
        for i, (r, q) in enumerate(zip(rows, QUESTIONS))
    ]
    one = {(r["sample"], r["condition"]): r for it in items for r in asker.ask([it])}
    assert {r["batch"] for r in one.values()} == {1}
    for chunks in ([items], [items[:3], items[3:]]):
        many = {(r["sample"], r["condition"]): r for c in chunks for r in asker.ask(c)}
        assert many.keys() == one.keys()
        assert all(many[k]["tokens"] == one[k]["tokens"] for k in one), [
            k for k in one if many[k]["tokens"] != one[k]["tokens"]
        ]
        # mixed lengths in one batch
        assert len({many[i, "original"]["prompt_tokens"] for i in range(4)}) == 4
    tokens = {c: one[0, c]["vision_tokens"] for c in KINDS}
    assert tokens == {c: int(c.split(":")[-1]) if c.startswith("keep") else 256 for c in KINDS}


def test_one_batch_of_mixed_kinds_and_lengths(tiny_vlm):
    """vlm.greedy itself: all 256 tokens, 40 kept tokens and 7 kept tokens, after questions of
    different lengths, in one left-padded batch, give each prompt's batch-1 tokens; each stops at
    its own eos id."""
    model, proc = tiny_vlm
    img = model.config.image_token_id
    prompts = []
    for q, kept in zip(
        QUESTIONS[:3],
        [None, torch.arange(0, 256, 6)[:40], torch.tensor([3, 50, 77, 100, 101, 200, 255])],
    ):
        inp = prompt_inputs(proc, q)
        ids = inp["input_ids"][0]
        with torch.no_grad():
            V = model.model.visual(inp["pixel_values"], grid_thw=inp["image_grid_thw"])
            V = getattr(V, "pooler_output", V)
        pos = vlm.mrope_positions(ids, img, (16, 16))
        prompts.append(
            vlm.prompt_embeds(model, ids, pos, V if kept is None else V[kept], kept, img)
        )
    assert len({len(p) for p in prompts}) == 3
    alone = [vlm.greedy(model, [p], 8, set())[0][0] for p in prompts]
    assert vlm.greedy(model, prompts, 8, set())[0] == alone
    eos = {alone[1][2]}  # the second prompt's third token ends its answer there; the others run on
    cut = vlm.greedy(model, prompts, 8, eos)[0]
    assert cut[1] == alone[1][: alone[1].index(alone[1][2]) + 1]
    assert all(
        c == a[: a.index(t) + 1] if (t := next((x for x in a if x in eos), None)) else c == a
        for c, a in zip(cut, alone)
    )


def test_prefill_flops_and_kv_bytes_from_the_config(tiny_vlm):
    """lm_cost's formula against torch's FLOP counter on the tiny model's real prefill (eager
    attention, whose matmuls the counter sees; the last token's logits only), and by hand: 2 layers,
    d = 2048, 2 heads of 1024, 1 key/value head, MLP 256, vocabulary 263. The KV bytes equal the
    cache the prefill leaves. FastV's pruned prefill: the first layer at n tokens, the second at
    n'."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import DynamicCache

    model, _ = tiny_vlm
    cfg = model.config.text_config
    n = 300

    def layer(n):
        return (
            2 * n * 2048 * (2048 + 2 * 1024)
            + 2 * n * 2048 * 2048
            + 4 * n * n * 2048
            + 6 * n * 2048 * 256
        )

    by_hand = 2 * layer(n) + 2 * 2048 * 263
    assert lm_cost.prefill_flops(cfg, n) == by_hand
    assert lm_cost.prefill_flops(cfg, n, pruned=(1, 108)) == layer(n) + layer(108) + 2 * 2048 * 263
    assert lm_cost.kv_bytes(cfg, n, 2, pruned=(1, 108)) == 2 * 1024 * (n + 108) * 2
    x, pos = torch.randn(1, n, 2048), torch.arange(n)[None, None].expand(3, 1, n)
    model.set_attn_implementation("eager")
    try:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            cache = DynamicCache()
            model(inputs_embeds=x, position_ids=pos, logits_to_keep=1, use_cache=True, cache=cache)
    finally:
        model.set_attn_implementation("sdpa")
    assert fc.get_total_flops() == by_hand
    held = sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
    )
    assert lm_cost.kv_bytes(cfg, n, 4) == held == 2 * 2 * 1024 * n * 4


def test_stored_bytes_per_image():
    """Bytes that reproduce each condition's tokens, by hand for [256, 2048] features in bf16 (2
    bytes), and the codecs' from their real payloads."""

    T, D, b = 256, 2048, 2

    def size(t):
        return transforms.stored_bytes(
            transforms.parse_spec(t), T, D, "layernorm", b, bases={"pca": torch.eye(D)}
        )

    assert size("original") == T * D * 2 and size("zeros") == 0
    assert size("svd:64") == size("nn:64") == 64 * (T + D) * 2 + 2 * T * 2
    assert size("keep:norm:32") == 32 * D * 2 + 32 * 2
    # one byte per number, a float32 scale per row
    assert size("codec:int8") == T * D + 4 * T + 2 * T * 2
    payload = feature_codecs.encode("pca_int8", torch.randn(T, D), 32, torch.eye(D))
    assert size("codec:pca_int8:32") == feature_codecs.payload_bytes(payload) + 2 * T * 2


def test_budgets_as_shares_of_the_tokens():
    """--keep and keep/merge/fastv specs take the field's shares (33.3 / 22.2 / 11.1 % of Qwen's 256
    tokens: 85, 57, 28 kept), recorded as k; a share outside (0, 1] is refused."""
    args = vqa_eval.get_args_parser().parse_args(
        [
            "--results_dir",
            "x",
            "--svd_ranks",
            "",
            "--rules",
            "norm",
            "--keep",
            "0.333,0.222,0.111,16",
        ]
        + ["--transforms", "merge:tome:0.25,fastv:2:0.5"]
    )
    got = [str(s) for s in vqa_eval.conditions(args, None, "subspace", 256)]
    assert got == [
        "original",
        "keep:norm:85",
        "keep:norm:57",
        "keep:norm:28",
        "keep:norm:16",
        "merge:tome:64",
    ] + ["fastv:2:128"]
    args.transforms = "keep:norm:1.5"
    with pytest.raises(UserError, match="keep:norm:1.5"):
        vqa_eval.conditions(args, None, "subspace", 256)


def test_question_aware_rules_answer(trained, tmp_path, tiny_vlm):
    """keep:cdpruner and keep:mmr run in vqa_eval with the question's embeddings from the model's
    own table; the kept tokens depend on the question."""
    summary = run(
        trained,
        tmp_path,
        "--svd_ranks",
        "",
        "--nn_ranks",
        "",
        "--transforms",
        "keep:cdpruner:32,keep:mmr:0.125",
    )
    rows = {s["condition"]: s for s in summary}
    assert rows["keep:cdpruner:32"]["vision_tokens"] == 32 and rows["keep:mmr:32"]["share"] == 0.125
    model, proc = tiny_vlm
    setup = transforms.TokenSetup("layernorm", (16, 16))
    asker = downstream.Asker(model, proc, torch.float32, setup, downstream.Decoding(str, 4))
    from PIL import Image

    image = Image.new("RGB", (448, 448), (120, 40, 200))
    towers = [
        asker.encode(image, q, question_aware=True).tower
        for q in ("what colour is the sign", "who is it")
    ]
    assert not torch.equal(towers[0].relevance, towers[1].relevance)
