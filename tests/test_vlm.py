"""vlm.py and downstream.Asker on every family: Qwen2-VL, Qwen2.5-VL and Qwen3-VL, transformers'
own classes built in code with random weights, answer as their own generate() does; a reduction
that keeps every token answers as the original; Qwen3-VL's deepstack features follow the kept
tokens exactly where the model's own forward puts them."""

import json

import pytest
import torch

import qwenvl_dataloader
import train_real_data
import vqa_eval
from lowrank import demo_set, encoders, images, lm_cost, vlm
from lowrank.cli import UserError
from lowrank.downstream import Asker, Decoding, Item
from lowrank.encoders import EncoderSpec, deepstack_of
from lowrank.transforms import TokenSetup, parse_spec

FAMILIES = ["tiny-random", "tiny-random-qwen2-vl", "tiny-random-qwen3-vl"]
QWEN3 = "tiny-random-qwen3-vl"
CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, *vlm.load_vlm(request.param, CPU, torch.float32, (448, 448))


def photos(n):
    rows = demo_set.make_rows(n, seed=1)
    return [(images.load_image(r["image"]["bytes"], (448, 448)), r["question"]) for r in rows]


def own_generate(model, proc, image, question, n):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist(), inputs


def test_every_family_answers_as_its_own_generate(family):
    """original: the tokens of generate(); keep and merge of every token: the same answers; two
    samples in one batch."""
    name, model, proc = family
    side = 448 // vlm.model_cell(name)
    T = side * side
    setup = TokenSetup("layernorm", (side, side))
    asker = Asker(model, proc, torch.float32, setup, Decoding(prompt=str, max_new_tokens=6))
    specs = [parse_spec(s) for s in ("original", f"keep:norm:{T}", f"merge:pool:{T}")]
    pics = photos(2)
    got = {
        (r["sample"], r["condition"]): r["tokens"]
        for r in asker.ask([Item(i, im, q, specs) for i, (im, q) in enumerate(pics)])
    }
    for i, (image, question) in enumerate(pics):
        assert got[(i, "original")] == own_generate(model, proc, image, question, 6)[0]
        assert got[(i, f"keep:norm:{T}")] == got[(i, "original")]
        assert got[(i, f"merge:pool:{T}")] == got[(i, "original")]


def test_qwen3_deepstack_features_follow_the_kept_tokens():
    """A third of the image tokens kept: the key/value cache our decoding fills equals the one the
    model's own forward fills from the shortened prompt with the kept tokens' features and deepstack
    features handed to it; without the deepstack features it differs from layer 1 on."""
    from transformers import DynamicCache
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    model, proc = vlm.load_vlm(QWEN3, CPU, torch.float32, (448, 448))
    image, question = photos(1)[0]
    _, inputs = own_generate(model, proc, image, question, 1)
    ids, img = inputs["input_ids"][0], model.config.image_token_id
    with torch.no_grad():
        out = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    V, ds = out.pooler_output, deepstack_of(out)
    assert ds.shape == (1, 196, V.shape[1])
    kept = torch.arange(0, 196, 3)
    pos = vlm.mrope_positions(ids, img, (14, 14))
    ours = DynamicCache()
    prompt = vlm.prompt_embeds(model, ids, pos, V[kept], kept, img, deepstack=ds[:, kept])
    vlm.greedy(model, [prompt], 1, set(), cache=ours)
    blind = DynamicCache()
    vlm.greedy(
        model, [vlm.prompt_embeds(model, ids, pos, V[kept], kept, img)], 1, set(), cache=blind
    )

    keep = torch.ones(len(ids), dtype=torch.bool)
    where = (ids == img).nonzero().squeeze(1)
    keep[where] = False
    keep[where[kept]] = True
    encoded = BaseModelOutputWithDeepstackFeatures(
        pooler_output=(V[kept],), deepstack_features=[(level[kept],) for level in ds]
    )
    with torch.no_grad():
        theirs = model(
            input_ids=ids[keep][None],
            position_ids=pos[:, keep][:, None],
            mm_encoder_outputs={"image": encoded},
            use_cache=True,
        ).past_key_values
    for layer, (a, b) in enumerate(zip(ours.layers, theirs.layers)):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-4)
        assert torch.equal(a.keys, blind.layers[layer].keys) == (layer == 0)


def test_fastv_before_the_deepstack_layers_is_refused():
    model, proc = vlm.load_vlm(QWEN3, CPU, torch.float32, (448, 448))
    model.config.vision_config.deepstack_visual_indexes = [0, 1]  # as if two levels
    asker = Asker(model, proc, torch.float32, TokenSetup("layernorm", (14, 14)), Decoding(str))
    with pytest.raises(UserError, match="after layers 0..1; K must be at least 2"):
        asker.check_fastv(parse_spec("fastv:1:32"))


def test_vqa_eval_on_a_qwen3_cache(tmp_path, capsys):
    """vqa_eval end to end on a cache of the tiny Qwen3-VL: its 196 tokens at 448 x 448, a reduction
    of every token answering as the original, the bytes of the deepstack level counted."""
    demo_set.write_parquet(demo_set.make_rows(12, seed=5), tmp_path / "data")
    qwenvl_dataloader.extract(
        tmp_path / "data", tmp_path / "cache", EncoderSpec(QWEN3, "cpu"), progress=False
    )
    run = tmp_path / "run"
    train_real_data.main(
        ["--cache_dir", str(tmp_path / "cache"), "--results_dir", str(run), "--device", "cpu"]
        + ["--rank", "8", "--epochs", "1", "--batch_size", "4", "--arch", "subspace"]
    )
    vqa_eval.main(
        ["--results_dir", str(run), "--limit", "2", "--max_new_tokens", "3", "--device", "cpu"]
        + ["--svd_ranks", "8", "--nn_ranks", "8", "--rules", "norm", "--keep", "49,196"]
        + ["--transforms", "resize:224,merge:pool:49,fastv:1:49,codec:int8", "--name", "q3"]
    )
    report = json.loads((run / "vqa_q3.json").read_text())
    rows = {r["condition"]: r for r in report["summary"]}
    assert rows["original"]["vision_tokens"] == 196 and rows["resize:224"]["vision_tokens"] == 49
    assert rows["original"]["bytes_per_image"] == 2 * 196 * 1024 * 4  # tokens + one deepstack level
    assert rows["keep:norm:196"]["consistency"] == 1.0
    assert "tiny-random-qwen3-vl is a randomly initialised model" in capsys.readouterr().out


def test_every_family_loads_from_a_checkpoint_directory(family, tmp_path):
    """The path a real checkpoint takes (config.json, weights, tokenizer with its chat template,
    preprocessor config), for each family: the model saved to a directory loads through it as the
    family's own class and answers exactly as the model built in code."""
    name, model, proc = family
    model.save_pretrained(tmp_path)
    proc.tokenizer.chat_template = vlm.CHAT_TEMPLATE
    proc.tokenizer.save_pretrained(tmp_path)
    proc.image_processor.save_pretrained(tmp_path)
    loaded, lproc = vlm.load_vlm(str(tmp_path), CPU, torch.float32, (448, 448))
    assert type(loaded) is type(model)
    image, question = photos(1)[0]
    want = own_generate(model, proc, image, question, 4)[0]
    assert own_generate(loaded, lproc, image, question, 4)[0] == want


@pytest.mark.parametrize("name", ["tiny-random", QWEN3])
def test_pixelprune_before_the_tower(name):
    """On photos without repeated cells pixelprune answers exactly as the original; on one with a
    flat square, the tower runs on the distinct cells only (its FLOPs from lm_cost on those cells),
    they enter the language model at their own positions, and the answer is that of the pruned
    tower's tokens put there by hand."""

    model, proc = vlm.load_vlm(name, CPU, torch.float32, (448, 448))
    cell = vlm.model_cell(name)
    side = 448 // cell
    asker = Asker(
        model, proc, torch.float32, TokenSetup("layernorm", (side, side)), Decoding(str, 6)
    )
    specs = [parse_spec("original"), parse_spec("pixelprune")]
    pics = photos(2)
    flat = pics[0][0].copy()
    flat.paste((250, 250, 250), (0, 0, 5 * cell, 3 * cell))  # 15 equal cells: 14 repeats
    items = [Item(i, im, q, specs) for i, (im, q) in enumerate(pics)]
    items.append(Item(2, flat, pics[0][1], specs))
    got = {(r["sample"], r["condition"]): r for r in asker.ask(items)}
    for i in (0, 1):
        assert got[(i, "pixelprune")]["tokens"] == got[(i, "original")]["tokens"]
        assert got[(i, "pixelprune")]["vision_tokens"] == side * side
    rec = got[(2, "pixelprune")]
    keep = encoders.repeated_cells(flat, cell)
    assert rec["vision_tokens"] == int(keep.sum()) == side * side - 14
    inputs = own_generate(model, proc, flat, pics[0][1], 1)[1]
    grid = tuple(inputs["image_grid_thw"][0].tolist())
    assert rec["tower_flops"] == lm_cost.tower_flops(model.config.vision_config, grid, keep)
    assert rec["tower_flops"] < got[(2, "original")]["tower_flops"]
    ids, img = inputs["input_ids"][0], model.config.image_token_id
    with torch.no_grad():
        out = encoders.pruned_tower(
            model.model.visual, inputs["pixel_values"], inputs["image_grid_thw"], keep
        )
    kept = keep.nonzero().squeeze(1)
    pos = vlm.mrope_positions(ids, img, (side, side))
    deep = encoders.deepstack_of(out)
    prompt = vlm.prompt_embeds(model, ids, pos, out.pooler_output, kept, img, deepstack=deep)
    assert rec["tokens"] == vlm.greedy(model, [prompt], 6, asker.eos)[0][0]
