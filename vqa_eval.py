"""
Does the model still answer? TextVQA accuracy of the full Qwen-VL (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)
when its vision tokens are replaced by a low-rank reconstruction (truncated SVD or a trained
factoriser at rank r), by zeros, or when only k tokens chosen by a tokens.py rule are kept.

    python vqa_eval.py --results_dir results_subspace --model Qwen/Qwen2.5-VL-3B-Instruct --device cuda \\
        --svd_ranks 16,32,64,128 --nn_ranks 16,32,64,128 --rules leverage,norm,random --keep 32,64
        --zeros --limit 500
    python vqa_eval.py --results_dir results_demo --model tiny-random --limit 8      (offline: tiny random model)

Per sample of the run's split (--split, --limit): the image is resized exactly as for extraction,
the question (with --prompt) goes through the model's own chat template and processor, the vision
tower runs once, and every condition answers greedily (--max_new_tokens) from the same prompt, with
its vision tokens put where the tower's output enters the language model (inputs_embeds).
Reconstructions are made in the space the factoriser was trained in (the run's --normalize,
layernorm by default) and mapped back to the model's scale with each token's own mean and standard
deviation (2 numbers per token, kept exactly). Kept tokens keep their own M-RoPE positions (time,
row, column of the full grid); the dropped ones are removed from the sequence, and the text after
the image keeps the positions it has with all tokens. Qwen3-VL's deepstack features follow every
transform (transforms.py says how for each kind). 'tiny-random' builds a tiny full Qwen2.5-VL in
code (fixed seed; its vision tower is the tiny-random encoder's; tiny-random-qwen2-vl and
tiny-random-qwen3-vl the same for those families) with a byte-level tokenizer and a Qwen-style chat
template: its accuracies mean nothing, it proves the mechanics.

Scores (vqa_score.py): TextVQA's score exactly as lmms-eval 0.7.x computes it (the EvalAI answer
processor, then min(#other references / 3, 1) over the leave-one-out subsets), and the top-answer
match. The default protocol is lmms-eval's for qwen2_5_vl (question.capitalize(), then the line
above). Beside accuracy and consistency, each condition's cost: vision tokens into the language
model, prefill FLOPs and KV-cache bytes (lm_cost.py), bytes per image, the transform's ms, prefill
ms and ms per decoding step. --batch_size samples answer together (left-padded, each with its own
positions and stop); `torchrun --nproc_per_node=N vqa_eval.py ...` shards the samples by rank.

Writes <out>/vqa_<name>.jsonl (one line per answer; a rerun resumes from it;
vqa_<name>.rank<r>.jsonl per process under torchrun), vqa_<name>.json / .csv (per condition and per
sample), vqa_<name>_summary.csv (per condition), vqa_<name>.png (accuracy against rank / kept
tokens) and vqa_<name>_cost.png (accuracy against each cost).
"""

import argparse
import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lowrank.answer_log import AnswerLog
from lowrank.cli import (
    HelpFormatter,
    UserError,
    add_device,
    add_dtype,
    dist_env,
    name_arg,
    out_folder,
    parse_ints,
    pick_device,
    positive_int,
    run_cli,
)
from lowrank.downstream import (
    PROMPT,
    QUESTION_TRANSFORMS,
    Asker,
    Decoding,
    Item,
    check_conditions,
    check_prompt,
    default_batch_size,
    fit_bases,
    score,
)
from lowrank.encoders import default_dtype
from lowrank.feature_cache import cache_grid, load_manifest
from lowrank.images import Source, fingerprint, load_image
from lowrank.plots import pyplot, save
from lowrank.reports import Column, print_table, write_csv
from lowrank.runs import BEST, first, load_run, read_run
from lowrank.selection import LRCP_RANK, QUESTION_RULES, RULES
from lowrank.transforms import Spec, TokenSetup, parse_spec, resize_tokens, stored_bytes
from lowrank.vlm import RANDOM_TEXT, check_max_new_tokens, feature_levels, load_vlm


def get_args_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_sample_flags(ap.add_argument_group("the run, the model and the samples"))
    add_condition_flags(ap.add_argument_group("the conditions"))
    add_answer_flags(ap.add_argument_group("answering and outputs"))
    return ap


def add_sample_flags(ap):
    ap.add_argument(
        "--results_dir",
        default="results",
        help="a training run: its split.json and cache; its best_model.pt for the factoriser conditions",
    )
    ap.add_argument(
        "--model",
        default=None,
        help="the full Qwen2-VL / Qwen2.5-VL / Qwen3-VL: a local directory or hub id, or "
        "'tiny-random', 'tiny-random-qwen2-vl', 'tiny-random-qwen3-vl' / 'random-3b' (random "
        "weights, built in code: mechanics / real-size cost); default: the cache's encoder",
    )
    ap.add_argument("--revision", default=None, help="hub revision of --model")
    ap.add_argument(
        "--dataset_dir", default=None, help="the images (default: the source recorded in the cache)"
    )
    ap.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="which samples of the run"
    )
    ap.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="first N samples of the split (default: all)",
    )


def add_condition_flags(ap):
    ap.add_argument(
        "--svd_ranks",
        default="16,32,64,128",
        help="truncated-SVD conditions (comma list; '' for none)",
    )
    ap.add_argument(
        "--nn_ranks",
        default="auto",
        help="factoriser conditions: comma list, 'auto' (the --svd_ranks up "
        "to its trained rank, if the run has a best_model.pt) or ''",
    )
    ap.add_argument(
        "--rules",
        default="",
        help=f"token-selection conditions: comma list of {', '.join(RULES + QUESTION_RULES)} "
        f"({', '.join(QUESTION_RULES)} weigh each token's relevance to the question)",
    )
    ap.add_argument(
        "--keep",
        default="64",
        help="kept tokens k for each --rules entry (comma list); a number with a point is a share of the image's "
        "tokens: 0.333,0.222,0.111 are the field's 33.3 / 22.2 / 11.1 %% budgets",
    )
    ap.add_argument(
        "--lrcp_rank",
        type=positive_int,
        default=LRCP_RANK,
        help="lrcp: rank of the training split's principal subspace",
    )
    ap.add_argument(
        "--zeros", action="store_true", help="add the control with every vision token set to zero"
    )
    ap.add_argument(
        "--transforms",
        default="",
        help="more conditions as transform specs (comma list): original, zeros, svd:<r>, nn:<r>, "
        "keep:<rule>:<k>, codec:<name>[:<r>], e.g. codec:pca_int8:64,keep:norm:32",
    )
    ap.add_argument("--seed", type=int, default=0, help="the random token rule")


def add_answer_flags(ap):
    ap.add_argument(
        "--prompt", default=PROMPT, help="the user turn after the image; {question} is replaced"
    )
    ap.add_argument(
        "--question_transform",
        default="capitalize",
        choices=list(QUESTION_TRANSFORMS),
        help="applied to the question first: capitalize (str.capitalize, lmms-eval's TextVQA protocol) or none",
    )
    ap.add_argument(
        "--max_new_tokens", type=positive_int, default=16, help="greedy decoding length limit"
    )
    ap.add_argument(
        "--batch_size",
        type=positive_int,
        default=None,
        help="samples answered together, per condition (default 32 on CUDA, 8 on CPU; 1: one at a time)",
    )
    add_device(ap)
    add_dtype(ap)
    ap.add_argument(
        "--name", type=name_arg, default=None, help="output stem vqa_<name> (default: the split)"
    )
    ap.add_argument("--out_dir", default=None, help="where the outputs go (default: --results_dir)")
    ap.add_argument(
        "--restart", action="store_true", help="discard the answers of an earlier run of this name"
    )


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    check_prompt(args.prompt)
    cfg, split = read_run(args.results_dir)
    cache, norm = cfg.cache_dir, cfg.normalization
    manifest = load_manifest(cache)
    enc, samples = manifest.encoder, manifest.samples
    name = answering_model(args.model, cache, enc)
    hw, dev = cache_grid(cache), pick_device(args.device)
    dtype = getattr(torch, args.dtype or default_dtype(dev))
    run = factoriser_run(args)
    nn_rank = run.config.rank if run else None
    conds = conditions(args, nn_rank, cfg.arch, hw[0] * hw[1])
    bases = fit_bases(conds, args.lrcp_rank, args.results_dir, cache, split["train"], norm)
    check_conditions(conds, cfg.arch, nn_rank, hw, enc.feature_dim, bases)
    for c in conds:  # a resize that is not a whole number of cells, before any work
        if c.kind == "resize":
            resize_tokens(c, enc.size, hw)
    idx = first(split[args.split], args.limit)
    check_questions(idx, samples, cache)
    out_dir = out_folder(args.out_dir or args.results_dir, "--out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"vqa_{args.name or args.split}"
    size = enc.size
    settings = run_settings(args, cfg, manifest, name, dtype, run)
    rank, world, _ = dist_env()
    log = AnswerLog(out_dir, stem.name, settings)
    done, own = open_logs(log, args.restart, rank, world)
    mine = idx[rank::world]  # the samples this process answers (all of them without torchrun)
    todo = [(i, [s for s in conds if (i, str(s)) not in done]) for i in mine]
    todo = [(i, specs) for i, specs in todo if specs]
    batch = args.batch_size or default_batch_size(dev)
    if rank == 0:
        n_todo = sum(len(specs) for _, specs in todo)
        print(
            f"{len(idx)} {args.split} samples from {cache} ({norm}), model {name} ({settings['dtype']} on {dev}"
            f"{f', {world} processes' if world > 1 else ''}); {len(conds)} conditions: {', '.join(map(str, conds))}; "
            f"{len(done)} answers already in {stem}.jsonl, {n_todo} to ask, batches of {batch}"
        )
    if todo:
        source = Source(args.dataset_dir or manifest.source_path)
        images = source_images(source, [i for i, _ in todo], samples, cache)
        model, proc = load_vlm(name, dev, dtype, size, args.revision)
        check_max_new_tokens(model, args.max_new_tokens, hw[0] * hw[1])
        max_svd = max((s.rank for s in conds if s.kind == "svd"), default=0)
        setup = TokenSetup(norm, hw, run.model if run else None, bases, max_svd)
        asker = Asker(model, proc, dtype, setup, decoding(args))
        load = partial(load_sample, images=images, samples=samples, size=size, done=done, log=own)
        ask_all(
            asker,
            todo,
            load=load,
            done=done,
            log_path=own,
            h=log.h,
            batch_size=batch,
            progress=rank == 0,
        )
    barrier(world)
    if rank != 0:
        return None
    done = log.read(talk=False) if world > 1 else done
    levels = feature_levels(name, args.revision)
    stored = bytes_per_image(
        conds,
        done,
        idx,
        enc=enc,
        hw=hw,
        norm=norm,
        element_bytes=dtype.itemsize,
        bases=bases,
        levels=levels,
    )
    return report(idx, conds, done, samples, stem=stem, settings=settings, stored=stored)


def bytes_per_image(conds, done, idx, *, enc, hw, norm, element_bytes, bases, levels):
    """{condition: stored bytes per image} (transforms.stored_bytes) on each condition's own tokens:
    the resized image's grid, pixelprune's kept cells (their mean over the answers), else the
    cache's grid."""
    out = {}
    for c in conds:
        T = hw[0] * hw[1]
        if c.kind == "resize":
            T = resize_tokens(c, enc.size, hw)
        if c.kind == "pixelprune":
            T = float(np.mean([done[(i, str(c))]["vision_tokens"] for i in idx]))
        out[str(c)] = stored_bytes(
            c, T, enc.feature_dim, norm, element_bytes, bases=bases, levels=levels
        )
    return out


def load_sample(i, *, images, samples, size, done, log):
    """(image, question) of sample i, or one UserError naming it (the answers so far stay in
    log)."""
    try:
        return load_image(images[i], size), samples[i].question
    except Exception as e:
        raise UserError(
            f"sample {i} ({samples[i].id}): unreadable image ({type(e).__name__}: {e}); "
            f"the {len(done)} answers so far are kept in {log}"
        ) from None


def answering_model(model, cache, enc):
    """The full model that answers: --model, or the cache's encoder; it must be the model whose
    merger output the cache holds."""
    name = model or enc.model
    if name != enc.model:
        raise UserError(
            f"--model {name}: the cache {cache} holds features of {enc.model}; the factoriser and "
            f"the token rules work on those features, so answer with the same model"
        )
    if enc.layer != "merger":
        raise UserError(
            f"{cache} holds the tower's {enc.layer}, not its output: the language model takes the merger's tokens"
        )
    return name


def factoriser_run(args):
    """The run's factoriser (runs.Run) when an nn condition may be asked, else None."""
    if args.nn_ranks and (args.nn_ranks != "auto" or (Path(args.results_dir) / BEST).exists()):
        return load_run(args.results_dir, device="cpu")
    return None


def check_questions(idx, samples, cache):
    missing = [i for i in idx if i not in samples or not samples[i].question]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(idx)} samples have no question in {cache} (e.g. sample "
            f"{missing[0]}): VQA needs a data set with questions and answers (TextVQA parquet or a "
            f"JSONL with 'question' and 'answers')"
        )


def decoding(args):
    """--prompt with --question_transform applied to the question, greedy to --max_new_tokens."""
    transform = QUESTION_TRANSFORMS[args.question_transform]
    return Decoding(
        lambda q: args.prompt.format(question=transform(q)), args.max_new_tokens, args.seed
    )


def conditions(args, nn_rank, arch, tokens):
    """The transforms this run's flags ask, in order (transforms.py specs): original, then --zeros,
    --svd_ranks, --nn_ranks (auto: the svd ranks the run's factoriser serves), --rules x --keep,
    then --transforms; each once. A k may be a share of the image's tokens (--keep 0.25,
    keep:norm:0.111)."""
    specs = [Spec("original")] + ([Spec("zeros")] if args.zeros else [])
    svd_ranks = parse_ints(args.svd_ranks, "--svd_ranks")
    specs += [Spec("svd", r) for r in svd_ranks]
    if nn_rank:
        auto = [r for r in svd_ranks if (r == nn_rank if arch == "symmetric" else r <= nn_rank)]
        specs += [
            Spec("nn", r)
            for r in (parse_ints(args.nn_ranks, "--nn_ranks") if args.nn_ranks != "auto" else auto)
        ]
    rules = [r for r in args.rules.split(",") if r.strip()]
    for rule in rules:
        if rule not in RULES + QUESTION_RULES:
            raise UserError(
                f"--rules: unknown '{rule}'; choose from {', '.join(RULES + QUESTION_RULES)}"
            )
    ks = [parse_spec(f"keep:norm:{k.strip()}", tokens).k for k in args.keep.split(",") if k.strip()]
    specs += [Spec("keep", k=k, rule=rule) for rule in rules for k in ks]
    specs += [parse_spec(t, tokens) for t in args.transforms.split(",") if t.strip()]
    return list(dict.fromkeys(specs))


def run_settings(args, cfg, manifest, name, dtype, run):
    """Everything an answer depends on; a log of other settings is refused."""
    return {
        "model": name,
        "revision": args.revision,
        "protocol": protocol(args, name, manifest.encoder.size, manifest.grid),
        "versions": versions(),
        "dtype": str(dtype).replace("torch.", ""),
        "normalization": cfg.normalization,
        "cache": str(cfg.cache_dir),
        "checkpoint": str(Path(args.results_dir) / BEST) if run else None,
        "checkpoint_sha": run.checkpoint_sha if run else None,  # retrained: other answers
        "lrcp_rank": args.lrcp_rank,
        "seed": args.seed,
        "log_version": 2,  # records with their cost
    }


def protocol(args, name, size, hw):
    """Everything that makes one answer protocol differ from another; a run's log and JSON record
    it, and a rerun with another is refused."""
    return {
        "prompt": args.prompt,
        "question_transform": args.question_transform,
        "image_first": True,
        "chat_template": "built in code" if name in RANDOM_TEXT else "the checkpoint's",
        "system_turn": "the chat template's default",
        "image_size": list(size),
        "vision_tokens": hw[0] * hw[1],
        "decoding": "greedy",
        "max_new_tokens": args.max_new_tokens,
    }


def versions():
    import transformers

    try:
        from importlib.metadata import version

        lmms = version("lmms-eval")
    except Exception:
        lmms = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "lmms_eval": lmms}


def open_logs(log, restart, rank, world):
    """-> (every answer already in the run's logs, the log this process appends to). Under torchrun
    every process reads all the logs before any appends to its own; --restart discards this run's
    logs first."""
    if restart and rank == 0:
        log.remove()
    barrier(world)
    done = log.read(talk=rank == 0)
    barrier(world)
    own = log.path(None if world == 1 else rank)
    log.start(own)
    return done, own


def barrier(world):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def source_images(source, indices, samples, cache):
    """{index: image bytes or path}; each must be the image the cache's features (and question) came
    from."""
    images = dict(source.iter_images(indices))
    for i in indices:
        fp = samples[i].fingerprint
        if i not in images or (fp and fingerprint(images[i]) != fp):
            what = (
                f"not in {source.path}"
                if i not in images
                else f"{source.path} holds another image than the one the cache {cache} was extracted from"
            )
            raise UserError(
                f"sample {i} ({samples[i].id}): {what}; point --dataset_dir at the data set "
                f"the cache was made from"
            )
    return images


def ask_all(asker, todo, *, load, done, log_path, h, batch_size, progress=True):
    """Ask every condition not yet answered, batch_size samples at a time. Each answer is appended
    to the log when its condition's batch is done, so a rerun resumes and a batch killed halfway
    leaves none of its answers."""
    bar = tqdm(total=sum(len(specs) for _, specs in todo), desc="vqa", disable=not progress)
    with log_path.open("a") as log:
        for b in range(0, len(todo), batch_size):
            items = [Item(i, *load(i), specs) for i, specs in todo[b : b + batch_size]]
            for rec in asker.ask(items):
                rec = {"h": h, **rec}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                done[(rec["sample"], rec["condition"])] = rec
                bar.update(1)
    bar.close()


def report(idx, conds, done, samples, *, stem, settings, stored=None):
    """Per-condition accuracy and cost table (printed, JSON, CSV), the accuracy-vs-budget plot and
    the accuracy-vs-cost chart."""
    per_sample, summary = score(
        idx, conds, done, samples, stored, settings["protocol"]["vision_tokens"]
    )
    print_summary(summary)
    if settings["model"] in RANDOM_TEXT:
        print(
            f"{settings['model']} is a randomly initialised model: these accuracies mean nothing; they prove the "
            f"mechanics (and, at real size, the cost)"
        )
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    Path(f"{stem}.json").write_text(
        json.dumps(
            {"settings": settings, "summary": summary, "peak_gpu_gib": peak, "samples": per_sample},
            indent=1,
        )
    )
    names = [str(s) for s in conds]
    header = ["sample", "id", "question", "answers"] + [
        f"{n}: {k}" for n in names for k in ("answer", "vqa_acc")
    ]
    rows = [
        [r["sample"], r["id"], r["question"], " | ".join(r["answers"])]
        + [x for n in names for x in (r[n]["answer"], f"{r[n]['vqa_acc']:.4f}")]
        for r in per_sample
    ]
    write_csv(f"{stem}.csv", rows, header)
    write_csv(f"{stem}_summary.csv", summary, [k for k in summary[0] if not k.endswith("ci95")])
    plot(summary, f"{stem}.png", settings)
    plot_cost(summary, f"{stem}_cost.png", settings)
    print(f"wrote {stem}.json, .csv, _summary.csv, .png, _cost.png")
    return summary


def gflops(flops):
    return f"{flops / 1e9:.2f}" if flops is not None else ""


COLUMNS = (
    Column("condition", 22, lambda s: s["condition"]),
    Column("VQA acc", 8, lambda s: f"{s['vqa_acc']:.4f}"),
    Column("vs original", 20, lambda s: f"{s['delta']:>+11.4f} ± {1.96 * s['delta_se']:<6.4f}"),
    Column("consist", 8, lambda s: f"{s['consistency']:.3f}"),
    Column(
        "R>W W>R (p)",
        15,
        lambda s: f"{s['right_to_wrong']:>4} {s['wrong_to_right']:>3} ({s['flips_p']:.2f})",
    ),
    Column("tokens", 7, lambda s: f"{s['vision_tokens']:.0f}"),
    Column("tower GF", 9, lambda s: gflops(s["tower_flops"])),
    Column("LLM GF", 8, lambda s: f"{s['prefill_flops'] / 1e9:.2f}"),
    Column("total GF", 9, lambda s: gflops(s["total_flops"])),
    Column("KV MiB", 8, lambda s: f"{s['kv_bytes'] / 2**20:.2f}"),
    Column(
        "KiB/img",
        9,
        lambda s: f"{s['bytes_per_image'] / 1024:.1f}" if s["bytes_per_image"] is not None else "",
    ),
    Column("trans ms", 9, lambda s: f"{s['transform_ms']:.2f}"),
    Column("tower ms", 9, lambda s: f"{s['tower_ms']:.1f}"),
    Column("prefill ms", 11, lambda s: f"{s['prefill_ms']:.1f}"),
    Column(
        "ms/token",
        9,
        lambda s: f"{s['decode_ms_per_token']:.2f}" if s["decode_ms_per_token"] else "",
    ),
)


def print_summary(summary):
    print_table(COLUMNS, summary)
    print(
        "VQA acc: min(#annotators / 3, 1) over the 10 leave-one-out subsets, normalised answers; vs original: paired "
        "difference, ± 1.96 standard errors over the samples (bootstrap 95 % intervals in the JSON); consist: share "
        "of answers equal to the original tokens' once normalised; R>W W>R (p): answers right with the original "
        "tokens and wrong here, and the reverse (right: score >= 0.5), McNemar's exact p; tokens: vision tokens into "
        "the language model; "
        "tower GF: the vision tower on the image (lm_cost.tower_flops); LLM GF: the language model's prefill "
        "(lm_cost.prefill_flops); total GF: both; KV MiB: the prompt's KV cache; KiB/img: what reproduces the "
        "tokens; trans ms: the transform; tower ms: the tower on one image; prefill ms and ms/token (one decoding "
        f"step): per batch of up to "
        f"{max(s['batch_size'] for s in summary):.0f} (fastv: one sample), medians, device-synchronised"
    )


def plot(summary, path, settings):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = {}
    labels = {"svd": "truncated SVD (svd:r)", "nn": "factoriser (nn:r)"}
    for s in summary:
        if s["value"] is None or s["kind"] in ("original", "zeros"):
            continue
        label = labels.get(s["kind"]) or (
            f"{s['kind']} k tokens: {s['rule']}"
            if s["kind"] in ("keep", "merge")
            else f"fastv k tokens after layer {s['layer']}"
            if s["kind"] == "fastv"
            else f"codec {s['codec']}"
        )
        groups.setdefault(label, []).append((s["value"], s["vqa_acc"]))
    for label, pts in groups.items():
        pts.sort()
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            "s--" if " k tokens" in label else "o-",
            label=label,
        )
    for s, style in (
        (summary[0], "k-"),
        (next((s for s in summary if s["kind"] == "zeros"), None), "k:"),
    ):
        if s is not None:
            ax.axhline(
                s["vqa_acc"],
                color="k",
                ls=style[1:],
                lw=1,
                label="original tokens" if s["kind"] == "original" else "all-zero tokens",
            )
    ax.set_xscale("log", base=2)
    xs = sorted({p[0] for pts in groups.values() for p in pts})
    if xs:
        ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("rank r (reconstructions) or kept tokens k")
    ax.set_ylabel("VQA accuracy")
    ax.set_title(f"VQA accuracy by vision-token budget, {settings['model']}, n={summary[0]['n']}")
    ax.legend(fontsize=8)
    fig.set_dpi(120)
    save(fig, path)


FAMILIES = {
    "svd": "reconstruction",
    "nn": "reconstruction",
    "keep": "selection",
    "merge": "merging",
    "fastv": "pruning in the LLM",
    "codec": "compression",
    "resize": "resolution",
    "pixelprune": "before the tower",
}


def plot_cost(summary, path, settings):
    """Accuracy against three costs (vision tokens, prefill FLOPs, bytes per image), every condition
    on each, one series per transform family (svd, nn, each rule, each codec), the original tokens a
    reference line."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    series = {}
    for s in summary:
        if s["kind"] in ("original", "zeros"):
            continue
        name = s["rule"] or s["codec"] or (f"K={s['layer']}" if s["kind"] == "fastv" else s["kind"])
        series.setdefault((FAMILIES.get(s["kind"], s["kind"]), name), []).append(s)
    marks = {
        "reconstruction": "o-",
        "selection": "s--",
        "compression": "^:",
        "merging": "D-.",
        "resolution": "v-",
    }
    axes_of = (
        ("vision_tokens", "vision tokens into the language model"),
        ("total_flops", "FLOPs: the vision tower and the language model's prefill"),
    )
    for ax, (key, label) in zip(axes, axes_of + (("bytes_per_image", "bytes per image"),)):
        for (fam, name), rows in series.items():
            rows = sorted((r for r in rows if r[key]), key=lambda r: r[key])
            ax.plot(
                [r[key] for r in rows],
                [r["vqa_acc"] for r in rows],
                marks.get(fam, "x-"),
                label=f"{fam}: {name}",
            )
        base = summary[0]
        ax.axhline(base["vqa_acc"], color="k", lw=1, label="original tokens")
        ax.plot([base[key]], [base["vqa_acc"]], "k*", ms=10)
        zeros = next((s for s in summary if s["kind"] == "zeros"), None)
        if zeros is not None:
            ax.axhline(zeros["vqa_acc"], color="k", ls=":", lw=1, label="all-zero tokens")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("VQA accuracy")
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"VQA accuracy against cost, {settings['model']}, n={summary[0]['n']}")
    fig.set_dpi(120)
    save(fig, path)


if __name__ == "__main__":
    run_cli(main)
