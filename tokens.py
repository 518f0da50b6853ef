"""
Which tokens carry the image? Token-selection rules compared on the features themselves: keep k of
an image's T tokens, rebuild every token from the kept ones (its projection onto their span, X̂ =
X·pinv(X_S)·X_S), and compare with rank-k truncated SVD, which no choice of k tokens can beat (X̂
has rank <= k); and with the answer boxes.

    python tokens.py --results_dir results --ks 16,32,64,128

Selection rules (selection.py): leverage, lrcp (--lrcp_rank), pivoted_qr, divprune, dart, norm,
grid, random (drawn --random_draws times: mean ± spread over the draws). Merging rules (merging.py):
pool, tome, visionzip: k merged tokens, every token rebuilt from their span; box recall counts their
representative tokens. visionzip needs the tower's attention: the cache's tower runs again on each
image (--device), so it is left out of the default rules for a cache without one (synthetic
features). Writes tokens_<name>.json / .csv, tokens_<name>_cosine.png (cosine vs k per rule, with
SVD), tokens_<name>_box.png (answer-box recall vs k) and tokens_<name>_kept.png (the kept tokens
over one image, with its box).
"""

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from lowrank import metrics
from lowrank.cli import (
    HelpFormatter,
    UserError,
    add_device,
    check_rank,
    name_arg,
    nonneg_int,
    parse_ints,
    pick_device,
    positive_int,
    run_cli,
)
from lowrank.dataset import FeatureDataset, cached_image, principal_basis, tower_attention
from lowrank.encoders import repeated_cells
from lowrank.feature_cache import (
    answer_box_masks,
    cache_grid,
    cache_image_size,
    cached_shape,
    load_manifest,
)
from lowrank.merging import MERGES, MERGING, merge, pool_shape
from lowrank.metrics import scale_bbox, timed
from lowrank.plots import pyplot, save
from lowrank.reports import Column, print_table, write_csv
from lowrank.runs import first, read_run
from lowrank.selection import (
    LRCP_RANK,
    QUESTION_RULES,
    RULES,
    SELECTION,
    box_hits,
    reconstruct_from,
    relevance,
    select,
)
from lowrank.vlm import question_embedder


def get_args_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument(
        "--results_dir",
        default="results",
        help="a training run's folder: its split.json and config (cache, normalisation) are used; no model is needed",
    )
    ap.add_argument("--cache_dir", default=None, help="default: the cache of the training run")
    ap.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="samples to evaluate"
    )
    ap.add_argument(
        "--num_samples",
        type=positive_int,
        default=None,
        help="first N samples of the split (default: all)",
    )
    ap.add_argument(
        "--ks",
        default="16,32,64,128",
        help="kept tokens: counts (16,32) or shares of the cache's T tokens (0.0625,0.125: one budget on any grid)",
    )
    ap.add_argument(
        "--rules",
        default=",".join(RULES + MERGES),
        help="comma list of selection and merging rules (see above)",
    )
    ap.add_argument(
        "--random_draws",
        type=positive_int,
        default=5,
        help="random: draws with seeds --seed, --seed + 1, ...",
    )
    add_device(ap, "where the tower runs for visionzip's attention")
    ap.add_argument(
        "--lrcp_rank",
        type=positive_int,
        default=LRCP_RANK,
        help="lrcp: rank of the training split's principal subspace",
    )
    ap.add_argument("--seed", type=int, default=0, help="random rule")
    ap.add_argument(
        "--name", type=name_arg, default=None, help="output stem tokens_<name> (default: the split)"
    )
    ap.add_argument(
        "--draw_idx",
        type=nonneg_int,
        default=0,
        help="position in the split of the image drawn with its kept tokens",
    )
    ap.add_argument("--draw_k", type=positive_int, default=32, help="k of that drawing")
    return ap


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    out = Path(args.results_dir)
    cfg, split = read_run(out)
    cache, norm = args.cache_dir or cfg.cache_dir, cfg.normalization
    T, D = cached_shape(cache)
    hw = cache_grid(cache)
    ks = budgets(args.ks, T)
    rules = checked_rules(args, ks, cache, hw, min(T, D))
    idx = first(split[args.split], args.num_samples)
    X_all = [x for x, _ in FeatureDataset(cache, idx, norm)]
    masks = answer_box_masks(cache, idx)
    basis = None
    if "lrcp" in rules:
        check_rank(args.lrcp_rank, min(T, D), "--lrcp_rank")
        basis = principal_basis(cache, split["train"], norm)[:, : args.lrcp_rank]
    print(
        f"{len(idx)} {args.split} samples [{T}, {D}] ({hw[0]}x{hw[1]} grid) from {cache} ({norm}); "
        f"{sum(m is not None for m in masks.values())} with an answer box; lrcp basis: top {args.lrcp_rank} "
        f"principal directions of {len(split['train'])} training images"
    )
    inputs = RuleInputs(hw, basis, sample_context(cache, idx, rules, args))
    seeds = [args.seed + d for d in range(args.random_draws)]
    rows, per_sample = measure(X_all, idx, masks, ks=ks, rules=rules, inputs=inputs, seeds=seeds)
    print_rows(rows)
    costs = rule_costs(rows, rules, T) + pixelprune_cost(cache, idx, hw)
    print_table(COST_COLUMNS, costs)
    stem = out / f"tokens_{args.name or args.split}"
    meta = {
        "split": args.split,
        "n": len(idx),
        "cache_dir": str(cache),
        "normalization": norm,
        "grid": list(hw),
        "shape": [T, D],
        "lrcp_rank": args.lrcp_rank,
        "seeds": seeds,
        "rule_costs": costs,
        "rows": rows,
    }
    Path(f"{stem}.json").write_text(json.dumps(meta, indent=1))
    write_csv(f"{stem}.csv", per_sample)
    paths = plot(rows, ks, rules, stem)
    if args.draw_idx >= len(idx):
        print(
            f"note: --draw_idx {args.draw_idx} is past the {len(idx)} {args.split} images: no drawing"
        )
    if 0 <= args.draw_idx < len(idx):
        i = args.draw_idx
        paths.append(
            draw_kept(
                X_all[i],
                idx[i],
                cache=cache,
                rules=rules,
                inputs=inputs,
                k=args.draw_k,
                seed=args.seed,
                stem=stem,
            )
        )
    print("wrote", ", ".join(str(p) for p in [f"{stem}.json", f"{stem}.csv", *paths]))
    return rows


def checked_rules(args, ks, cache, hw, max_rank):
    """--rules as a list, every k within the tokens and pool's grid; visionzip left out of the
    default list on a cache without the tower's output tokens."""
    rules = args.rules.split(",")
    for k in ks:
        check_rank(k, max_rank, "--ks")
    check_rank(args.draw_k, max_rank, "--draw_k")
    bad = set(rules) - set(RULES + QUESTION_RULES + MERGES)
    if bad:
        raise UserError(
            f"--rules: unknown {sorted(bad)}; choose from {', '.join(RULES + QUESTION_RULES + MERGES)}"
        )
    if "pool" in rules:
        for k in ks + [args.draw_k]:
            try:
                pool_shape(hw, k)
            except ValueError as e:
                raise UserError(f"--ks / --draw_k {k}: {e}") from None
    m = load_manifest(cache)
    towerless = m.synthetic or m.encoder.layer != "merger"
    if towerless and "visionzip" in rules and args.rules == get_args_parser().get_default("rules"):
        # the default asks for every rule; visionzip needs the tower's output tokens
        rules.remove("visionzip")
    return rules


def budgets(spec, T):
    """--ks: integers are token counts; numbers with a decimal point are shares of T (rounded, at
    least 1)."""
    if "." not in spec:
        return parse_ints(spec, "--ks")
    try:
        shares = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise UserError(
            f"--ks {spec}: expected counts (16,32) or shares of the tokens (0.0625,0.125)"
        ) from None
    if any(not 0 < f <= 1 for f in shares):
        raise UserError(f"--ks {spec}: a share of the tokens must lie in (0, 1]")
    return list(dict.fromkeys(max(1, round(f * T)) for f in shares))


@dataclass(frozen=True)
class RuleInputs:
    """What the rules need beyond the tokens: the merged grid, lrcp's basis, and per sample what
    some rules read, {sample: {'attention': [T] (visionzip), 'relevance': [T] (cdpruner, mmr, spare)}}."""

    hw: tuple
    basis: object = None
    context: dict = field(default_factory=dict)


def reduce(rule, X, k, inputs, sample, gen):
    """(the rows every token is rebuilt from [k, D], their token positions [k]): the kept tokens of
    a selection rule, or the merged tokens of a merging rule at their representatives. context: what
    some rules need of the sample, {'attention': [T] (visionzip), 'relevance': [T] (cdpruner,
    mmr)}."""
    context, hw = inputs.context.get(sample, {}), inputs.hw
    if rule in MERGES:
        W, reps = merge(rule, X, k, hw, context.get("attention"))
        return W @ X.double(), reps
    kept = select(
        rule, X, k, hw=hw, basis=inputs.basis, generator=gen, relevance=context.get("relevance")
    )
    return X[kept], kept


def sample_context(cache, idx, rules, args):
    """{sample: {'attention': ..., 'relevance': ...}} for the rules that need them: the tower's
    attention (visionzip, the tower run again) and each token's relevance to the sample's question
    (cdpruner, mmr, spare: the question's token embeddings from the cache's model, its embedding table
    alone)."""
    context = {i: {} for i in idx}
    if "visionzip" in rules:
        for i, att in tower_attention(cache, idx, pick_device(args.device)).items():
            context[i]["attention"] = att
    if set(rules) & set(QUESTION_RULES):
        m = load_manifest(cache)
        missing = [i for i in idx if not m.sample(i).question]
        if missing:
            raise UserError(
                f"--rules {','.join(sorted(set(rules) & set(QUESTION_RULES)))} weigh each token's relevance to the "
                f"question, and {len(missing)} samples of {cache} have none (e.g. sample {missing[0]})"
            )
        embed = question_embedder(m.encoder.model, m.encoder.revision)
        # the model's scale: the space of its embedding table
        raw = FeatureDataset(cache, idx, "none")
        for x, i in raw:
            context[i]["relevance"] = relevance(x, embed(m.sample(i).question))
    return context


def measure(X_all, idx, masks, *, ks, rules, inputs, seeds):
    """Every rule at every k on every sample -> (one summary row per rule and k, one row per sample,
    rule, k and draw). random is drawn once per seed; its row is the mean over the draws, with their
    spread."""
    rows, per_sample = [], []
    for k in ks:
        svd_m = metrics.metrics(
            torch.stack(X_all), torch.cat([metrics.svd_reconstruct(x[None], k) for x in X_all])
        )
        for rule in tqdm(rules, desc=f"k={k}", leave=False):
            draws = []
            for seed in seeds if rule == "random" else seeds[:1]:
                gen = torch.Generator().manual_seed(seed)
                recs, secs = [], 0.0
                for j, (i, X) in enumerate(zip(idx, X_all)):
                    t0 = time.perf_counter()
                    S, kept = reduce(rule, X, k, inputs, i, gen)
                    secs += time.perf_counter() - t0
                    m = metrics.metrics(X[None], reconstruct_from(X, S)[None])
                    rec, prec = box_hits(kept, masks[i]) if masks[i] is not None else (None, None)
                    recs.append(
                        {
                            "sample_id": i,
                            "rule": rule,
                            "k": k,
                            "seed": seed if rule == "random" else None,
                            "cosine": m["cosine"].item(),
                            "energy": m["energy"].item(),
                            "svd_cosine": svd_m["cosine"][j].item(),
                            "box_recall": rec,
                            "box_precision": prec,
                            "box_area_share": int(masks[i].sum()) / len(X)
                            if masks[i] is not None
                            else None,
                        }
                    )
                per_sample += recs
                draws.append((recs, 1000 * secs / len(idx)))
            rows.append(summarise(rule, k, draws, len(X_all[0])))
    return rows, per_sample


def summarise(rule, k, draws, T):
    """One row per rule and k: means over the samples (and over random's draws, with the spread of
    the draws' means)."""

    def col(recs, key):
        return [r[key] for r in recs if r[key] is not None]

    def mean(v):
        return float(np.mean(v)) if v else None

    per_draw = {
        key: [mean(col(recs, key)) for recs, _ in draws] for key in ("cosine", "box_recall")
    }
    recs = [r for rs, _ in draws for r in rs]
    row = {
        "rule": rule,
        "k": k,
        "n": len(draws[0][0]),
        "draws": len(draws),
        "cosine": mean(col(recs, "cosine")),
        "cosine_std": float(np.std(col(recs, "cosine"))),
        "cosine_draw_spread": float(np.std(per_draw["cosine"])) if len(draws) > 1 else None,
        "energy": mean(col(recs, "energy")),
        "svd_cosine": mean(col(draws[0][0], "svd_cosine")),
        "box_n": len(col(draws[0][0], "box_recall")),
        "box_recall": mean(col(recs, "box_recall")),
        "box_recall_draw_spread": (
            float(np.std(per_draw["box_recall"]))
            if len(draws) > 1 and None not in per_draw["box_recall"]
            else None
        ),
        "box_precision": mean(col(recs, "box_precision")),
        "random_expected_recall": k / T if col(recs, "box_recall") else None,
        "box_area_share": mean(col(draws[0][0], "box_area_share")),
        "ms_per_sample": float(np.mean([ms for _, ms in draws])),
    }
    row["gap_to_svd"] = row["cosine"] - row["svd_cosine"]
    return row


def rule_costs(rows, rules, T):
    """What each rule needs, where it acts, and its own time per image at the k nearest a quarter of
    the T tokens (256 -> 64 for Qwen at 448 px)."""
    k = min({r["k"] for r in rows}, key=lambda k: abs(k - T / 4))
    out = []
    for rule in rules:
        spec = SELECTION.get(rule) or MERGING[rule]
        ms = next(r["ms_per_sample"] for r in rows if r["rule"] == rule and r["k"] == k)
        out.append(
            {
                "rule": rule,
                "kind": "selection" if rule in SELECTION else "merging",
                "acts": spec.acts,
                "question_aware": spec.question_aware,
                "attention_weights": spec.needs_attention,
                "k": k,
                "ms_per_image": ms,
            }
        )
    return out


def pixelprune_cost(cache, idx, hw):
    """PixelPrune's row (before the tower, so not on the features): finding the cells whose pixels
    repeat (encoders.repeated_cells, exact) on the cached samples' own images, ms per image and the
    cells the tower would still see (mean). Empty for a cache without its images or of the ViT."""
    manifest = load_manifest(cache)
    if manifest.encoder.family == "vit-onnx" or manifest.encoder.layer != "merger":
        return []
    kept, times = [], []
    for sid in idx:
        image = cached_image(cache, sid)
        if image is None:
            continue
        cell = image.shape[1] // hw[1]
        keep, secs = timed(repeated_cells, Image.fromarray(image), cell)
        kept.append(int(keep.sum()))
        times.append(secs * 1e3)
    if not kept:
        return []
    row = {"rule": "pixelprune", "kind": "pruning", "acts": "before the tower"}
    row.update(question_aware=False, attention_weights=False, k=round(float(np.mean(kept)), 1))
    return [dict(row, ms_per_image=float(np.mean(times)))]


COST_COLUMNS = (
    Column("rule", 11, lambda r: r["rule"]),
    Column("kind", 10, lambda r: r["kind"]),
    Column("acts", 17, lambda r: r["acts"]),
    Column("question", 9, lambda r: "yes" if r["question_aware"] else "no"),
    Column("attention", 10, lambda r: "yes" if r["attention_weights"] else "no"),
    Column("k", 7, lambda r: f"{r['k']:g}"),
    Column("ms/image", 10, lambda r: f"{r['ms_per_image']:.2f}"),
)


def print_rows(rows):
    print(
        f"{'rule':<11}{'k':>5}{'cosine':>9}{'± draws':>8}{'rank-k SVD':>11}{'gap':>9}{'energy':>8}{'box recall':>11}"
        f"{'± draws':>8}{'(random)':>9}{'precision':>10}{'(area)':>8}{'ms/sample':>10}"
    )
    for r in rows:

        def f(v, w, p=3):
            return f"{v:>{w}.{p}f}" if v is not None else f"{'—':>{w}}"

        print(
            f"{r['rule']:<11}{r['k']:>5}{r['cosine']:>9.4f}{f(r['cosine_draw_spread'], 8, 4)}{r['svd_cosine']:>11.4f}"
            f"{r['gap_to_svd']:>9.4f}{r['energy']:>8.4f}{f(r['box_recall'], 11)}{f(r['box_recall_draw_spread'], 8)}"
            f"{f(r['random_expected_recall'], 9)}"
            f"{f(r['box_precision'], 10)}{f(r['box_area_share'], 8)}{r['ms_per_sample']:>10.2f}"
        )


def plot(rows, ks, rules, stem):
    plt = pyplot()

    paths = [Path(f"{stem}_cosine.png"), Path(f"{stem}_box.png")]
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=150)
    svd = [next(r["svd_cosine"] for r in rows if r["k"] == k) for k in ks]
    ax.plot(ks, svd, "k-", lw=2, label="rank-k truncated SVD (the optimum)")
    for rule in rules:
        ax.plot(
            ks,
            [next(r["cosine"] for r in rows if r["k"] == k and r["rule"] == rule) for k in ks],
            "o-",
            label=rule,
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("tokens kept k")
    ax.set_ylabel("cosine of all tokens rebuilt from the kept ones")
    ax.set_title("Token selection vs truncated SVD")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, paths[0])
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=150)
    if rows[0]["box_recall"] is not None:
        ax.plot(
            ks,
            [next(r["random_expected_recall"] for r in rows if r["k"] == k) for k in ks],
            "k--",
            label="random (expected: k / T)",
        )
        for rule in rules:
            ax.plot(
                ks,
                [
                    next(r["box_recall"] for r in rows if r["k"] == k and r["rule"] == rule)
                    for k in ks
                ],
                "o-",
                label=rule,
            )
        ax.set_title(f"Answer-box recall (n={rows[0]['box_n']} samples with a box)")
    else:
        ax.text(
            0.5,
            0.5,
            "no sample of this split has an answer box",
            ha="center",
            transform=ax.transAxes,
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("tokens kept k")
    ax.set_ylabel("share of the box's tokens kept")
    ax.grid(alpha=0.3)
    if rows[0]["box_recall"] is not None:
        ax.legend(fontsize=8)
    save(fig, paths[1])
    return paths


def draw_kept(X, sid, *, cache, rules, inputs, k, seed, stem):
    """The kept (or representative) tokens of each rule over the image, with the answer box."""
    plt = pyplot()
    from matplotlib.patches import Rectangle

    size = cache_image_size(cache)
    meta = load_manifest(cache).sample(sid)
    image = cached_image(cache, sid)
    H, W = inputs.hw
    cols = math.ceil(len(rules) / 2)
    fig, ax = plt.subplots(
        2, cols, figsize=(3.6 * cols, 8.0), dpi=130, squeeze=False, layout="constrained"
    )
    for a, rule in zip(ax.flat, rules):
        kept = reduce(rule, X, k, inputs, sid, torch.Generator().manual_seed(seed))[1]
        m = np.zeros(H * W)
        m[kept.numpy()] = 1
        if image is not None:
            a.imshow(image)
        a.imshow(
            m.reshape(H, W),
            cmap="magma",
            alpha=0.5,
            vmin=0,
            vmax=1,
            extent=(0, size[0], size[1], 0),
            interpolation="nearest",
        )
        if meta.bbox and meta.image_size:
            x, y, w, h = scale_bbox(meta.bbox, meta.image_size, size)
            a.add_patch(Rectangle((x, y), w, h, fill=False, ec="cyan", lw=2))
        a.set_title(f"{rule}: {k} of {H * W} kept", fontsize=9)
        a.set_xticks([])
        a.set_yticks([])
    for a in ax.flat[len(rules) :]:
        a.axis("off")
    fig.suptitle(
        f"sample {sid} ({meta.id or '?'}): kept tokens (bright), answer box (cyan)", fontsize=10
    )
    path = Path(f"{stem}_kept.png")
    save(fig, path)
    return path


if __name__ == "__main__":
    run_cli(main)
