"""
Does the model still answer? TextVQA accuracy of the full Qwen2.5-VL when its vision tokens are replaced by a
low-rank reconstruction (truncated SVD or a trained factoriser at rank r), by zeros, or when only k tokens chosen by
a tokens.py rule are kept.

    python vqa_eval.py --results_dir results_subspace --model Qwen/Qwen2.5-VL-3B-Instruct --device cuda \\
        --svd_ranks 16,32,64,128 --nn_ranks 16,32,64,128 --rules leverage,norm,random --keep 32,64 --zeros --limit 500
    python vqa_eval.py --results_dir results_demo --model tiny-random --limit 8      (offline: tiny random model)

Per sample of the run's split (--split, --limit): the image is resized exactly as for extraction, the question
(with --prompt) goes through the model's own chat template and processor, the vision tower runs once, and every
condition answers greedily (--max_new_tokens) from the same prompt, with its vision tokens put where the tower's
output enters the language model (inputs_embeds). Reconstructions are made in the space the factoriser was trained
in (the run's --normalize, layernorm by default) and mapped back to the model's scale with each token's own mean and
standard deviation (2 numbers per token, kept exactly). Kept tokens keep their own M-RoPE positions (time, row,
column of the full grid); the dropped ones are removed from the sequence, and the text after the image keeps the
positions it has with all tokens. 'tiny-random' builds a tiny full Qwen2.5-VL in code (fixed seed; its vision tower
is the tiny-random encoder's) with a byte-level tokenizer and a Qwen-style chat template: its accuracies mean
nothing, it proves the mechanics.

Scores: the standard VQA accuracy (min(#annotators who gave the answer / 3, 1), averaged over the 10 leave-one-out
subsets of the 10 answers), after the usual answer normalisation (punctuation, articles, number words), and exact
match (the normalised answer equals the most common normalised reference). Writes <out>/vqa_<name>.jsonl (one line
per answered sample and condition; a rerun resumes from it), vqa_<name>.json / .csv (per condition and per sample)
and vqa_<name>.png (accuracy against rank / kept tokens).
"""
import argparse
import csv
import inspect
import json
import re
import time
from collections import Counter
from pathlib import Path

import torch

import qwenvl_dataloader as qd
import svd_baseline as sb
import tokens as tk
from model import Symmetric

PROMPT = "{question}\nAnswer the question using a single word or phrase."
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
# Qwen2.5-VL's chat layout (default system turn, image as <|vision_start|><|image_pad|><|vision_end|>), for the tiny
# model only: a real checkpoint brings its own template.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m.role != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}"
    "{% else %}{% for c in m.content %}{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ----------------------------------------------------------------------------------------------------------------
# VQA accuracy

_PUNCT = set(";/[]\"{}()=+\\_-><@`,?!")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(s):
    """The VQA evaluation's answer normalisation: whitespace; each punctuation mark is deleted where it touches a space
    (or where the text has a digit,digit comma), else replaced by a space; periods not before a digit deleted; lower
    case; number words to digits; articles dropped."""
    t = " ".join(str(s).replace("\n", " ").replace("\t", " ").split())
    digit_comma = re.search(r"\d,\d", t) is not None
    out = t
    for p in _PUNCT:
        if p in t:
            out = out.replace(p, "" if (p + " " in t or " " + p in t or digit_comma) else " ")
    out = re.sub(r"\.(?!\d)", "", out)
    return " ".join(_NUMBERS.get(w, w) for w in out.lower().split() if w not in _ARTICLES)


def vqa_accuracy(answer, references):
    """min(#references equal to the answer / 3, 1), averaged over the len(references) subsets that leave one
    reference out (10 choose 9 for VQA's 10 answers); both sides normalised."""
    a = normalize_answer(answer)
    refs = [normalize_answer(r) for r in references]
    if not refs:
        return float("nan")
    accs = [min(sum(r == a for j, r in enumerate(refs) if j != i) / 3, 1.0) for i in range(len(refs))]
    return sum(accs) / len(accs)


def exact_match(answer, references):
    """1.0 when the normalised answer equals the most common normalised reference."""
    refs = [normalize_answer(r) for r in references]
    return float(bool(refs) and normalize_answer(answer) == Counter(refs).most_common(1)[0][0])


# ----------------------------------------------------------------------------------------------------------------
# the model

def tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens, no merges) with Qwen's special tokens, built in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL[1:])


def make_processor(tokenizer, image_processor, chat_template):
    """transformers' Qwen2_5_VLProcessor (chat template, <|image_pad|> expansion) without a video processor, whose
    class check needs torchvision: images only here."""
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" and arg is None else super().check_argument_for_proper_class(name, arg)

    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


# Full models built in code with random weights: the text side of each; the vision side is qd.RANDOM_TOWERS[name].
# tiny-random proves the mechanics in seconds on a CPU; random-3b has Qwen2.5-VL-3B's published sizes (3.75B
# parameters) for ms/sample and memory figures on a GPU without the weights (bench_gpu.sh).
RANDOM_TEXT = {
    qd.TINY: dict(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=256,
                  vocab_size=None, rope_scaling={"type": "mrope", "mrope_section": [256, 128, 128]}),
    qd.RANDOM_3B: dict(num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, intermediate_size=11008,
                       vocab_size=151936, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
}


def random_config(name, tokenizer):
    """The Qwen2_5_VLConfig of a RANDOM_TEXT model, its special tokens those of tokenizer."""
    from transformers import Qwen2_5_VLConfig
    ids = dict(zip(SPECIAL, tokenizer.convert_tokens_to_ids(SPECIAL)))
    vision = qd.RANDOM_TOWERS[name][1]
    text = dict(RANDOM_TEXT[name], hidden_size=vision["out_hidden_size"], bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    text["vocab_size"] = text["vocab_size"] or len(tokenizer)
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], bos_token_id=ids["<|endoftext|>"],
                            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                            tie_word_embeddings=text.get("tie_word_embeddings", False))


def random_vlm(name, tokenizer, device):
    """A full Qwen2.5-VL with random weights from qd.TINY_SEED, built on device; its vision tower carries the weights
    of the encoder of the same name, so a cache extracted with --model <name> holds exactly its vision tokens."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(qd.TINY_SEED)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(random_config(name, tokenizer),
                                                                attn_implementation="sdpa")
    model.model.visual.load_state_dict(qd.random_tower(name)[0].state_dict())
    return model


def load_vlm(name, device, dtype, size, revision=None):
    """-> (model in eval mode, processor). One of RANDOM_TEXT (built in code) or a Qwen2.5-VL checkpoint (local
    directory or hub id)."""
    if name in RANDOM_TEXT:
        tok = tiny_tokenizer()
        model = random_vlm(name, tok, device)
        proc = make_processor(tok, qd.image_processor(model.config.vision_config, "qwen2_5_vl", size), CHAT_TEMPLATE)
        return model.to(device, dtype).eval(), proc
    if name in qd.RANDOM_TOWERS:
        raise qd.UserError(f"--model {name}: a vision tower only; vqa_eval needs a full model "
                           f"({', '.join(RANDOM_TEXT)} built in code, or a Qwen2.5-VL checkpoint)")
    family = qd.checkpoint_family(name, revision)
    if family != "qwen2_5_vl":
        raise qd.UserError(f"--model {name} is a {family} checkpoint; vqa_eval handles Qwen2.5-VL (its M-RoPE "
                           f"positions are computed here)")
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(name, revision=revision, dtype=dtype,
                                                               attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(name, revision=revision)
    template = tok.chat_template
    try:  # newer checkpoints keep the template in chat_template.json(.jinja), beside the processor config
        from transformers import AutoProcessor
        template = AutoProcessor.from_pretrained(name, revision=revision).chat_template or template
    except Exception:  # e.g. the video processor needs torchvision: the tokenizer's template is the same
        pass
    proc = make_processor(tok, qd.image_processor(model.config.vision_config, family, size, name, revision), template)
    return model.to(device).eval(), proc


def mrope_positions(input_ids, image_token_id, grid_hw):
    """[3, L] M-RoPE positions (time, row, column) of one sequence holding one image of grid_hw merged tokens, as
    Qwen2-VL / Qwen2.5-VL number them: text counts up on all three axes; the image's token at (row, col) gets
    (s, s + row, s + col), s = the position after the preceding text; the text after the image resumes at
    s + max(rows, cols)."""
    ids = input_ids.tolist()
    L = len(ids)
    start = ids.index(image_token_id)
    h, w = grid_hw
    pos = torch.zeros(3, L, dtype=torch.long)
    pos[:, :start] = torch.arange(start)
    rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    pos[0, start:start + h * w] = start
    pos[1, start:start + h * w] = start + rows
    pos[2, start:start + h * w] = start + cols
    after = torch.arange(L - start - h * w) + start + max(h, w)
    pos[:, start + h * w:] = after
    return pos


@torch.no_grad()
def greedy(model, embeds, positions, max_new_tokens, eos_ids):
    """Greedy decoding from prompt embeddings [1, L, H] and M-RoPE positions [3, L]; new tokens take positions
    max + 1, max + 2, ... on all three axes (what the model's own generate does after an image)."""
    from transformers import DynamicCache
    cache = DynamicCache()
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.x / 4.x
    embed = model.get_input_embeddings()
    pos, out, x = positions[:, None, :], [], embeds
    nxt = int(positions.max()) + 1
    for _ in range(max_new_tokens):
        logits = model(inputs_embeds=x, position_ids=pos, use_cache=True, **{cache_kw: cache}).logits
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        if tok in eos_ids:
            break
        x = embed(torch.tensor([[tok]], device=embeds.device))
        pos = torch.full((3, 1, 1), nxt, dtype=torch.long, device=embeds.device)
        nxt += 1
    return out


# ----------------------------------------------------------------------------------------------------------------
# conditions

def conditions(args, nn_rank, arch):
    """[(name, kind, value)] in the order they are asked; parsed from the flags."""
    ints = lambda s: [int(v) for v in s.split(",") if v.strip()]
    out = [("original", "original", None)]
    if args.zeros:
        out.append(("zeros", "zeros", None))
    out += [(f"svd r={r}", "svd", r) for r in ints(args.svd_ranks)]
    if nn_rank:
        auto = [r for r in ints(args.svd_ranks) if (r == nn_rank if arch == "symmetric" else r <= nn_rank)]
        out += [(f"{arch} r={r}", "nn", r) for r in (ints(args.nn_ranks) if args.nn_ranks != "auto" else auto)]
    rules = [r for r in args.rules.split(",") if r.strip()]
    out += [(f"{rule} k={k}", "keep", (rule, k)) for rule in rules for k in ints(args.keep)]
    return out


def vision_tokens(kind, value, X, Xn, svd, norm, nn_model, hw, basis, gen):
    """-> (tokens [T', D] in the model's scale, kept indices or None). X: the tower's tokens, Xn = normalize(X);
    svd: (A, B) of Xn's truncated SVD at the largest --svd_ranks. Reconstructions in the factoriser's space (norm),
    mapped back with each token's own mean and standard deviation."""
    if kind == "original":
        return X, None
    if kind == "zeros":
        return torch.zeros_like(X), None
    if kind == "keep":
        rule, k = value
        return None, tk.select(rule, Xn, k, hw, basis, gen).sort().values
    if kind == "svd":
        Xh = svd[0][:, :value] @ svd[1][:value]
    else:
        Xh = (nn_model(Xn[None])[0] if isinstance(nn_model, Symmetric) else nn_model(Xn[None], rank=value)[0])
    return qd.denormalize(Xh, X, norm), None


def answer(model, proc, ids, positions, V, kept, image_token_id, max_new_tokens, eos_ids):
    """Greedy answer with the image tokens' embeddings replaced by V [T, D]; with kept indices, V [k, D] holds only
    the kept tokens: they keep their own positions and the other image tokens leave the sequence."""
    embeds = model.get_input_embeddings()(ids[None])
    positions = positions.to(ids.device)
    img = (ids == image_token_id).nonzero().squeeze(1)
    kept = kept.to(ids.device) if kept is not None else None
    if kept is None:
        embeds[0, img] = V.to(embeds.dtype)
        pos = positions
    else:
        keep = torch.ones(len(ids), dtype=torch.bool, device=ids.device)
        keep[img] = False
        keep[img[kept]] = True
        embeds[0, img[kept]] = V.to(embeds.dtype)
        embeds, pos = embeds[:, keep], positions[:, keep]
    out = greedy(model, embeds, pos, max_new_tokens, eos_ids)
    text = proc.tokenizer.decode([t for t in out if t < len(proc.tokenizer)], skip_special_tokens=True)  # random-3b:
    return text.strip(), out                                            # a vocabulary larger than the byte tokenizer


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=qd.HelpFormatter)
    ap.add_argument("--results_dir", default="results", help="a training run: its split.json and cache; its "
                                                           "best_model.pt for the factoriser conditions")
    ap.add_argument("--model", default=None, help="the full Qwen2.5-VL: a local directory or hub id, or 'tiny-random' / "
                                                  "'random-3b' (random weights, built in code: mechanics / real-size "
                                                  "cost); default: the cache's encoder")
    ap.add_argument("--revision", default=None, help="hub revision of --model")
    ap.add_argument("--dataset_dir", default=None, help="the images (default: the source recorded in the cache)")
    ap.add_argument("--split", default="test", choices=["train", "val", "test"], help="which samples of the run")
    ap.add_argument("--limit", type=int, default=None, help="first N samples of the split (default: all)")
    ap.add_argument("--svd_ranks", default="16,32,64,128", help="truncated-SVD conditions (comma list; '' for none)")
    ap.add_argument("--nn_ranks", default="auto", help="factoriser conditions: comma list, 'auto' (the --svd_ranks up "
                                                       "to its trained rank, if the run has a best_model.pt) or ''")
    ap.add_argument("--rules", default="", help=f"token-selection conditions: comma list of {', '.join(tk.RULES)}")
    ap.add_argument("--keep", default="64", help="kept tokens k for each --rules entry (comma list)")
    ap.add_argument("--lrcp_rank", type=int, default=32, help="lrcp: rank of the training split's principal subspace")
    ap.add_argument("--zeros", action="store_true", help="add the control with every vision token set to zero")
    ap.add_argument("--prompt", default=PROMPT, help="the user turn after the image; {question} is replaced")
    ap.add_argument("--max_new_tokens", type=int, default=16, help="greedy decoding length limit")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    ap.add_argument("--dtype", default=None, help="model dtype (default bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--seed", type=int, default=0, help="the random token rule")
    ap.add_argument("--name", default=None, help="output stem vqa_<name> (default: the split)")
    ap.add_argument("--out_dir", default=None, help="where the outputs go (default: --results_dir)")
    ap.add_argument("--restart", action="store_true", help="discard the answers of an earlier run of this name")
    args = ap.parse_args(argv)
    from tqdm import tqdm

    cfg, split = qd.read_run(args.results_dir)
    cache, norm = cfg["cache_dir"], cfg["normalization"]
    manifest = qd.read_manifest(cache)
    enc = manifest["encoder"]
    name = args.model or enc["model"]
    if name != enc["model"]:
        raise qd.UserError(f"--model {name}: the cache {cache} holds features of {enc['model']}; the factoriser and "
                           f"the token rules work on those features, so answer with the same model")
    size = qd.parse_image_size(enc.get("image_size", qd.DEFAULT_IMAGE_SIZE))
    hw = qd.cache_grid(cache)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype or qd.default_dtype(dev))

    ckpt = Path(args.results_dir) / "best_model.pt"
    nn_model, nn_rank, arch = None, None, cfg["arch"]
    if args.nn_ranks and (args.nn_ranks != "auto" or ckpt.exists()):
        from compare_svd_nn import load_run
        nn_model, ck, _, _, _ = load_run(args.results_dir, device="cpu")
        nn_rank = ck["config"]["rank"]
    conds = conditions(args, nn_rank, arch)
    for _, kind, v in conds:
        if kind == "nn" and arch == "symmetric" and v != nn_rank:
            raise qd.UserError(f"--nn_ranks {v}: the symmetric model in {args.results_dir} serves only its trained "
                               f"rank {nn_rank}")
        if kind == "nn" and not 1 <= v <= nn_rank:
            raise qd.UserError(f"--nn_ranks {v}: the model in {args.results_dir} serves ranks 1..{nn_rank} (its "
                               f"trained rank)")
        if kind == "svd":
            qd.check_rank(v, min(hw[0] * hw[1], enc["feature_dim"]), "--svd_ranks")
        if kind == "keep":
            if v[0] not in tk.RULES:
                raise qd.UserError(f"--rules: unknown '{v[0]}'; choose from {', '.join(tk.RULES)}")
            qd.check_rank(v[1], hw[0] * hw[1], "--keep")
    basis = None
    if any(kind == "keep" and v[0] == "lrcp" for _, kind, v in conds):
        basis = tk.lrcp_basis(cache, split["train"], norm, args.lrcp_rank)

    idx = split[args.split][: args.limit] if args.limit else split[args.split]
    samples = manifest["samples"]
    missing = [i for i in idx if not samples.get(str(i), {}).get("question")]
    if missing:
        raise qd.UserError(f"{len(missing)} of {len(idx)} samples have no question in {cache} (e.g. sample "
                           f"{missing[0]}): VQA needs a data set with questions and answers (TextVQA parquet or a "
                           f"JSONL with 'question' and 'answers')")
    source = qd.Source(args.dataset_dir or manifest["source"]["path"])

    out_dir = Path(args.out_dir or args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"vqa_{args.name or args.split}"
    log_path = stem.with_suffix(".jsonl")
    settings = {"model": name, "revision": args.revision, "prompt": args.prompt, "max_new_tokens": args.max_new_tokens,
                "dtype": str(dtype).replace("torch.", ""), "normalization": norm, "cache": str(cache),
                "checkpoint": str(ckpt) if nn_model is not None else None, "seed": args.seed}
    done = {}
    if log_path.exists() and not args.restart:
        lines = [json.loads(l) for l in log_path.read_text().splitlines() if l.strip()]
        if lines and lines[0].get("settings") != settings:
            raise qd.UserError(f"{log_path} holds answers made with other settings ({lines[0].get('settings')}); "
                               f"use another --name, or --restart to discard them")
        done = {(r["sample"], r["condition"]): r for r in lines[1:]}
    else:
        log_path.write_text(json.dumps({"settings": settings}) + "\n")
    todo = [(i, c) for i in idx for c in conds if (i, c[0]) not in done]
    print(f"{len(idx)} {args.split} samples from {cache} ({norm}), model {name} ({settings['dtype']} on {dev}); "
          f"{len(conds)} conditions: {', '.join(c[0] for c in conds)}; {len(done)} answers already in {log_path}, "
          f"{len(todo)} to ask")

    if todo:
        model, proc = load_vlm(name, dev, dtype, size, args.revision)
        img_id = model.config.image_token_id
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # int or list (e.g. Qwen's 2)
        eos_ids = ({getattr(model.config, "eos_token_id", None), proc.tokenizer.eos_token_id}
                   | set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])) - {None}
        gen = torch.Generator().manual_seed(args.seed)
        max_svd = max((v for _, kind, v in conds if kind == "svd"), default=0)
        nn_model = nn_model.to(dev) if nn_model is not None else None
        images = dict(source.iter_images(sorted({i for i, _ in todo})))
        for i in sorted({i for i, _ in todo}):  # the image must be the one the cache's features (and question) came from
            fp = samples[str(i)].get("fingerprint")
            if i not in images or (fp and qd.fingerprint(images[i]) != fp):
                what = (f"not in {source.path}" if i not in images else
                        f"{source.path} holds another image than the one the cache {cache} was extracted from")
                raise qd.UserError(f"sample {i} ({samples[str(i)].get('id')}): {what}; point --dataset_dir at the "
                                   f"data set the cache was made from")
        bar = tqdm(total=len(todo), desc="vqa")
        with log_path.open("a") as log:
            for i in idx:
                mine = [c for c in conds if (i, c[0]) not in done]
                if not mine:
                    continue
                meta = samples[str(i)]
                try:
                    image = qd.load_image(images[i], size)
                except Exception as e:
                    raise qd.UserError(f"sample {i} ({meta.get('id')}): unreadable image ({type(e).__name__}: {e}); "
                                       f"the {len(done)} answers so far are kept in {log_path}") from None
                messages = [{"role": "user", "content": [{"type": "image"},
                                                         {"type": "text", "text": args.prompt.format(question=meta["question"])}]}]
                text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                inputs = proc(text=[text], images=[image], return_tensors="pt")
                ids = inputs["input_ids"][0].to(dev)
                with torch.no_grad():
                    t0 = time.perf_counter()
                    V = model.model.visual(inputs["pixel_values"].to(dev, dtype), grid_thw=inputs["image_grid_thw"].to(dev))
                    V = getattr(V, "pooler_output", V).float()
                    tower_ms = (time.perf_counter() - t0) * 1e3
                positions = mrope_positions(ids.cpu(), img_id, hw)
                Xn = qd.normalize(V, norm)
                svd = [f[0] for f in sb.truncated_svd(Xn[None], max_svd)[:2]] if max_svd else None
                for cname, kind, v in mine:
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        Vc, kept = vision_tokens(kind, v, V, Xn, svd, norm, nn_model, hw, basis, gen)
                        if kept is not None:
                            Vc = V[kept.to(V.device)]
                    text_out, toks = answer(model, proc, ids, positions, Vc, kept, img_id, args.max_new_tokens, eos_ids)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    rec = {"sample": i, "condition": cname, "answer": text_out, "tokens": toks,
                           "ms": (time.perf_counter() - t0) * 1e3, "tower_ms": tower_ms}
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    done[(i, cname)] = rec
                    bar.update(1)
        bar.close()
    return report(idx, conds, done, samples, stem, settings)


def report(idx, conds, done, samples, stem, settings):
    """Per-condition accuracy table (printed, JSON, CSV) and the accuracy-vs-budget plot."""
    names = [c[0] for c in conds]
    per_sample = []
    for i in idx:
        refs = samples[str(i)].get("answers") or []
        row = {"sample": i, "id": samples[str(i)].get("id"), "question": samples[str(i)]["question"], "answers": refs}
        for n in names:
            a = done[(i, n)]["answer"]
            row[n] = {"answer": a, "vqa_acc": vqa_accuracy(a, refs), "exact": exact_match(a, refs),
                      "changed": a != done[(i, "original")]["answer"], "ms": done[(i, n)]["ms"]}
        per_sample.append(row)
    summary, N = [], len(per_sample)
    base = sum(r["original"]["vqa_acc"] for r in per_sample) / N
    print(f"{'condition':<22}{'VQA acc':>9}{'vs original (± 1.96 se)':>26}{'exact':>8}{'changed':>9}{'ms/sample':>11}")
    for (n, kind, v) in conds:
        acc = sum(r[n]["vqa_acc"] for r in per_sample) / N
        d = [r[n]["vqa_acc"] - r["original"]["vqa_acc"] for r in per_sample]  # paired: the same questions
        se = (sum((x - acc + base) ** 2 for x in d) / (N - 1) / N) ** 0.5 if N > 1 else float("nan")
        s = {"condition": n, "kind": kind, "value": v, "n": N, "vqa_acc": acc, "delta": acc - base, "delta_se": se,
             "exact": sum(r[n]["exact"] for r in per_sample) / N,
             "changed": sum(r[n]["changed"] for r in per_sample) / N,
             "ms_per_sample": sorted(r[n]["ms"] for r in per_sample)[N // 2]}
        summary.append(s)
        print(f"{n:<22}{acc:>9.4f}{s['delta']:>+17.4f} ± {1.96 * se:<6.4f}{s['exact']:>8.3f}{s['changed']:>9.3f}"
              f"{s['ms_per_sample']:>11.1f}")
    print("VQA acc: min(#annotators / 3, 1) over the 10 leave-one-out subsets, normalised answers; vs original: paired "
          "difference, ± 1.96 standard errors over the samples; changed: share of answers that differ from the "
          "original tokens'; ms: median per sample (the vision tower's run is shared)")
    if settings["model"] in RANDOM_TEXT:
        print(f"{settings['model']} is a randomly initialised model: these accuracies mean nothing; they prove the "
              f"mechanics (and, at real size, the cost)")
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None
    stem.with_suffix(".json").write_text(json.dumps({"settings": settings, "summary": summary, "peak_gpu_gib": peak,
                                                     "samples": per_sample}, indent=1))
    with stem.with_suffix(".csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sample", "id", "question", "answers"] + [f"{n}: {k}" for n in names for k in ("answer", "vqa_acc")])
        for r in per_sample:
            w.writerow([r["sample"], r["id"], r["question"], " | ".join(r["answers"])]
                       + [x for n in names for x in (r[n]["answer"], f"{r[n]['vqa_acc']:.4f}")])
    plot(summary, stem.with_suffix(".png"), settings)
    print(f"wrote {stem}.json, .csv, .png")
    return summary


def plot(summary, path, settings):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = {}
    for s in summary:
        if s["kind"] in ("svd", "nn"):
            groups.setdefault(s["condition"].split(" r=")[0], []).append((s["value"], s["vqa_acc"]))
        elif s["kind"] == "keep":
            groups.setdefault(f"keep k tokens: {s['value'][0]}", []).append((s["value"][1], s["vqa_acc"]))
    for label, pts in groups.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if "keep" not in label else "s--", label=label)
    for s, style in ((summary[0], "k-"), (next((s for s in summary if s["kind"] == "zeros"), None), "k:")):
        if s is not None:
            ax.axhline(s["vqa_acc"], color="k", ls=style[1:], lw=1, label="original tokens" if s["kind"] == "original" else "all-zero tokens")
    ax.set_xscale("log", base=2)
    xs = sorted({p[0] for pts in groups.values() for p in pts})
    if xs:
        ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("rank r (reconstructions) or kept tokens k")
    ax.set_ylabel("VQA accuracy")
    ax.set_title(f"VQA accuracy by vision-token budget, {settings['model']}, n={summary[0]['n']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    qd.run_cli(main)
