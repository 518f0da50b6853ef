"""
The truncated-SVD baseline (the Eckart-Young optimum) of a feature cache: its metrics at one rank,
or the captured energy over a sweep of ranks. The SVD and the metrics themselves live in metrics.py.

    python svd_baseline.py --cache_dir feature_cache_real --rank 128
    python svd_baseline.py --cache_dir feature_cache_real --ranks 16,32,64,128,256 --results_dir results
"""

import argparse
import json
from pathlib import Path

import torch

from lowrank import metrics
from lowrank.cli import (
    HelpFormatter,
    add_device,
    check_rank,
    parse_ints,
    pick_device,
    positive_int,
    run_cli,
)
from lowrank.dataset import FeatureDataset, make_loader
from lowrank.feature_cache import NORMALIZATIONS, cached_indices, cached_shape, lossy_note
from lowrank.plots import plot_energy_curve
from lowrank.runs import first, read_split


def get_args_parser():
    ap = argparse.ArgumentParser(
        description="Truncated-SVD baseline metrics for a feature cache.",
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--cache_dir", default="feature_cache_real", help="the feature cache")
    ap.add_argument(
        "--rank", type=int, default=128, help="rank of the truncation (without --ranks)"
    )
    ap.add_argument(
        "--ranks", default=None, help="comma list for a rank sweep, e.g. 16,32,64,128,256"
    )
    ap.add_argument(
        "--split",
        default="all",
        choices=["all", "train", "val", "test"],
        help="samples to use; a split needs split.json in --results_dir (written by training)",
    )
    ap.add_argument(
        "--results_dir",
        default="results",
        help="where split.json is read and the sweep plot written",
    )
    ap.add_argument(
        "--num_samples", type=positive_int, default=None, help="first N samples (default: all)"
    )
    ap.add_argument(
        "--normalize", default="layernorm", choices=NORMALIZATIONS, help="as in training"
    )
    ap.add_argument(
        "--method",
        default=metrics.DEFAULT_METHOD,
        choices=metrics.METHODS,
        help="exact truncated SVD method",
    )
    ap.add_argument("--batch_size", type=positive_int, default=32, help="samples per batch")
    add_device(ap)
    return ap


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    args.device = str(pick_device(args.device))
    idx = (
        cached_indices(args.cache_dir)
        if args.split == "all"
        else read_split(args.results_dir)[args.split]
    )
    idx = first(idx, args.num_samples)
    ranks = parse_ints(args.ranks, "--ranks") if args.ranks else [args.rank]
    for r in ranks:
        check_rank(r, min(cached_shape(args.cache_dir)), "--ranks" if args.ranks else "--rank")
    ds = FeatureDataset(args.cache_dir, idx, args.normalize)
    loader = make_loader(ds, args.batch_size)
    print(
        f"cache {args.cache_dir}: {len(ds)} samples ({args.split}), normalisation {args.normalize}, "
        f"method {args.method}, device {args.device}{lossy_note(args.cache_dir)}"
    )
    if not args.ranks:

        def reconstruct(X):
            return metrics.svd_reconstruct(X, args.rank, args.method)

        per, _, secs = metrics.evaluate(reconstruct, loader, args.device, "svd")
        s = metrics.summarize(per)
        print(f"SVD rank {args.rank} (n={len(ds)}): {metrics.format_summary(s)}")
        print(f"{1000 * secs / len(ds):.2f} ms per sample")
        return s
    return rank_sweep(args, loader, ranks, len(ds))


def rank_sweep(args, loader, ranks, n):
    """Captured energy and cosine of truncated SVD at each rank -> svd_rank_sweep.json,
    svd_energy_vs_rank.png."""
    S = torch.cat([metrics.singular_values(X.to(args.device)).cpu() for X, _ in loader])
    energy = metrics.captured_energy(S)  # [N, min(T, D)]
    print(f"{'rank':>5} {'energy':>16} {'cosine':>16}")
    rows = []
    for r in ranks:
        e = energy[:, min(r, energy.shape[1]) - 1]
        rows.append(
            {
                "rank": r,
                "energy_mean": e.mean().item(),
                "energy_std": e.std().item(),
                "cosine_mean": e.sqrt().mean().item(),
                "cosine_std": e.sqrt().std().item(),
            }
        )
        print(f"{r:>5} {e.mean():.4f} ± {e.std():.4f} {e.sqrt().mean():.4f} ± {e.sqrt().std():.4f}")
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    sweep = {"n": n, "normalization": args.normalize, "split": args.split, "rows": rows}
    (out / "svd_rank_sweep.json").write_text(json.dumps(sweep, indent=1))
    plot_energy_curve(
        energy,
        out / "svd_energy_vs_rank.png",
        ranks=ranks,
        title=f"Truncated SVD, {args.cache_dir} ({args.split}, n={n}, {args.normalize})",
    )
    print(f"wrote {out / 'svd_rank_sweep.json'} and {out / 'svd_energy_vs_rank.png'}")
    return rows


if __name__ == "__main__":
    run_cli(main)
