"""
Where along the vision tower does the representation become low-rank? Runs the cache's tower once
per image with hooks on the patch embedding, every block and the merger (and Qwen3-VL's deepstack
mergers), and reports per layer over a split:

    energy_r / cosine_r    what the rank-r truncated SVD keeps of the layer's tokens (--ranks)
    effective_rank         exp of the entropy of the normalised singular values (Roy & Vetterli
                           2007)
    stable_rank            ‖X‖²_F / σ₁²
    participation_ratio    (Σσ²)² / Σσ⁴
    shared_r               the share of all images' energy in one top-r principal subspace of the
                           layer, fitted on these images (how much one basis serves them all;
                           --shared_rank)

    python layers.py --results_dir results --split test --num_samples 64 --device cuda

Tokens are those of the layer in raster order (Qwen2.5-VL's window order undone): one per 14-px
patch in the patch embedding and the blocks (1,024 at 448²), one per 28-px cell after the merger
(256). Statistics are taken per image (the run's normalisation applied to each token first) and
averaged; only a D x D Gram matrix per layer is kept. Writes layers_<name>.json / .csv and
layers_<name>.png (the statistics against depth, full-attention blocks marked). A layer as a feature
cache: qwenvl_dataloader.py --layer block_<i>.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from lowrank.cli import (
    HelpFormatter,
    UserError,
    add_device,
    check_rank,
    name_arg,
    parse_ints,
    parse_ranks,
    pick_device,
    positive_int,
    run_cli,
)
from lowrank.dataset import cache_encoder, rerun_tower
from lowrank.encoders import RANDOM_TOWERS, layer_grid, layer_names, tower_layers
from lowrank.feature_cache import cache_grid, load_manifest, normalize
from lowrank.metrics import spectrum_stats
from lowrank.plots import pyplot, save
from lowrank.reports import write_csv
from lowrank.runs import first, read_run


def get_args_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument(
        "--results_dir",
        default="results",
        help="a training run: its split and cache (no model needed)",
    )
    ap.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="which samples"
    )
    ap.add_argument(
        "--num_samples", type=positive_int, default=64, help="first N samples of the split"
    )
    ap.add_argument("--ranks", default="16,64", help="ranks r of energy_r and cosine_r")
    ap.add_argument(
        "--shared_rank", type=positive_int, default=64, help="r of the shared principal subspace"
    )
    add_device(ap, "where the tower runs")
    ap.add_argument(
        "--name", type=name_arg, default=None, help="output stem layers_<name> (default: the split)"
    )
    return ap


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    cfg, split = read_run(args.results_dir)
    cache, norm = cfg.cache_dir, cfg.normalization
    manifest = load_manifest(cache)
    enc = manifest.encoder
    # (a synthetic cache has no tower: cache_encoder says so)
    if manifest.encoder.layer != "merger":
        raise UserError(
            f"{cache} holds the tower's {manifest.encoder.layer}: layers.py taps every layer of a merger-output cache"
        )
    ranks = parse_ints(args.ranks, "--ranks")
    encoder = cache_encoder(cache, pick_device(args.device))
    names = layer_names(encoder.tower)
    idx = first(split[args.split], args.num_samples)
    hw = cache_grid(cache)
    limit = min(hw[0] * hw[1] * 4, max(encoder.tower.config.hidden_size, enc.feature_dim))
    ranks = parse_ranks(args.ranks, limit)
    check_rank(args.shared_rank, limit, "--shared_rank")
    print(
        f"{len(idx)} {args.split} images of {cache} through {enc.model}'s tower ({len(names)} layers: "
        f"{names[0]} .. {names[-1]}; {norm} per token)"
    )
    per_image, grams = {n: [] for n in names}, {}
    for _, layers in rerun_tower(encoder, cache, idx, tower_layers, "layers"):
        for n, X in layers.items():
            X = normalize(X[0].double(), norm)
            per_image[n].append(spectrum_stats(torch.linalg.svdvals(X), ranks))
            grams[n] = grams.get(n, 0) + X.T @ X
    rows = [
        summarise(encoder.tower, n, per_image[n], grams[n], args.shared_rank, hw) for n in names
    ]
    print_rows(rows, ranks, args.shared_rank)
    stem = Path(args.results_dir) / f"layers_{args.name or args.split}"
    full = list(getattr(encoder.tower, "fullatt_block_indexes", None) or [])
    meta = {
        "cache_dir": str(cache),
        "model": enc.model,
        "n": len(idx),
        "split": args.split,
        "normalization": norm,
    }
    meta.update(ranks=ranks, shared_rank=args.shared_rank, full_attention_blocks=full, rows=rows)
    Path(f"{stem}.json").write_text(json.dumps(meta, indent=1))
    write_csv(f"{stem}.csv", rows)
    title = f"{enc.model}, {len(idx)} {args.split} images"
    if enc.model in RANDOM_TOWERS:
        title += " (random weights: the mechanics, not a real model's depth profile)"
    plot(rows, ranks, args.shared_rank, full, f"{stem}.png", title)
    print(f"wrote {stem}.json, .csv, .png")
    return rows


def summarise(tower, name, stats, gram, shared_rank, hw):
    """A layer's row: the mean (and spread) of every per-image statistic, and the shared subspace's
    energy."""
    eig = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
    rows, cols, cell = layer_grid(tower, name, hw)
    row = {
        "layer": name,
        "tokens": rows * cols,
        "grid": f"{rows}x{cols}",
        "cell_px": cell,
        "dim": gram.shape[0],
    }
    for k in stats[0]:
        v = [s[k] for s in stats]
        row[k], row[f"{k}_std"] = float(np.mean(v)), float(np.std(v))
    row[f"shared_{shared_rank}"] = float(eig[:shared_rank].sum() / eig.sum())
    return row


def print_rows(rows, ranks, shared_rank):
    cols = [f"energy_{r}" for r in ranks] + ["effective_rank", "stable_rank", "participation_ratio"]
    cols.append(f"shared_{shared_rank}")
    print(
        f"{'layer':<14}{'tokens':>7}{'cell':>5}{'dim':>6}"
        + "".join(f"{c.replace('_ratio', ''):>20}" for c in cols)
    )
    for r in rows:
        print(
            f"{r['layer']:<14}{r['tokens']:>7}{r['cell_px']:>5}{r['dim']:>6}"
            + "".join(f"{r[c]:>20.4f}" for c in cols)
        )
    print(
        "energy_r: the rank-r truncated SVD's share of each image's energy (mean over images); effective rank: exp of "
        "the entropy of σ / Σσ; stable rank: ‖X‖²_F / σ₁²; participation: (Σσ²)² / Σσ⁴; shared_r: the share of all "
        "images' energy in one top-r principal subspace of the layer"
    )


def plot(rows, ranks, shared_rank, full, path, title):
    plt = pyplot()

    x = np.arange(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=130)
    for r in ranks:
        a.plot(
            x, [row[f"energy_{r}"] for row in rows], "o-", label=f"rank-{r} SVD energy (per image)"
        )
    a.plot(
        x,
        [row[f"shared_{shared_rank}"] for row in rows],
        "k--",
        label=f"one shared rank-{shared_rank} basis",
    )
    b.plot(x, [row["effective_rank"] for row in rows], "o-", label="effective rank")
    b.plot(x, [row["participation_ratio"] for row in rows], "s-", label="participation ratio")
    b.plot(x, [row["stable_rank"] for row in rows], "^-", label="stable rank")
    b.set_yscale("log")
    for ax in (a, b):
        for i, row in enumerate(rows):
            if row["layer"].startswith("block_") and int(row["layer"].split("_")[1]) in full:
                ax.axvline(i, color="grey", ls=":", lw=1)
        ax.set_xticks(
            x, [row["layer"].replace("block_", "") for row in rows], rotation=90, fontsize=7
        )
        ax.set_xlabel("layer (blocks by number; dotted: full-attention blocks)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    a.set_ylabel("share of energy")
    b.set_ylabel("dimensions")
    fig.suptitle(f"Low-rank structure along the tower: {title}", fontsize=10)
    save(fig, path)


if __name__ == "__main__":
    run_cli(main)
