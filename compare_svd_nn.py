"""
Compare a trained factoriser with truncated SVD at the same rank, on the same samples and
normalisation.

    python compare_svd_nn.py --rank 128 --results_dir results

Writes compare_rank<r>.json, compare_rank<r>.csv, compare_rank<r>_cosine_hist.png,
compare_rank<r>_scatter.png and compare_rank<r>_energy.png into the results directory (with _<split>
and _<checkpoint> appended to the stem for another split than test or another checkpoint than
best_model.pt).
"""

import argparse
import json
from pathlib import Path

import torch

from lowrank import metrics, reports
from lowrank.cli import (
    HelpFormatter,
    add_checkpoint,
    add_device,
    pick_device,
    positive_int,
    run_cli,
)
from lowrank.dataset import FeatureDataset, make_loader
from lowrank.feature_cache import answer_box_masks, lossy_note
from lowrank.plots import plot_energy_curve, pyplot, save
from lowrank.runs import first, load_run, output_stem
from lowrank.tail_objective import TailTarget


def get_args_parser():
    ap = argparse.ArgumentParser(
        description="Truncated SVD vs the trained factoriser, paired on the same samples.",
        formatter_class=HelpFormatter,
    )
    add_checkpoint(ap)
    ap.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test"],
        help="which samples of split.json",
    )
    ap.add_argument(
        "--num_samples",
        type=positive_int,
        default=None,
        help="first N samples of the split (default: all)",
    )
    ap.add_argument("--cache_dir", default=None, help="default: the cache the model was trained on")
    ap.add_argument(
        "--batch_size",
        type=positive_int,
        default=64,
        help="samples per batch (evaluation and timing)",
    )
    ap.add_argument(
        "--svd_method",
        default=metrics.DEFAULT_METHOD,
        choices=metrics.METHODS,
        help="exact truncated SVD method (svd_baseline.py); all give the same numbers",
    )
    add_device(ap)
    return ap


def paired(nn, svd):
    """Per-sample NN - SVD differences, summarised (box metrics over the samples that have a
    box)."""
    return metrics.summarize({k: [a - b for a, b in zip(nn[k], svd[k])] for k in nn})


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    args.device = str(pick_device(args.device))
    run = load_run(
        args.results_dir,
        args.checkpoint,
        args.split,
        rank=args.rank,
        cache_dir=args.cache_dir,
        device=args.device,
    )
    model, ck, cfg, cache_dir = run.model, run.checkpoint, run.config, run.cache_dir
    idx = first(run.indices, args.num_samples)
    r, norm = cfg.rank, cfg.normalization
    loader = make_loader(FeatureDataset(cache_dir, idx, norm), args.batch_size)
    masks = answer_box_masks(cache_dir, idx)  # tokens overlapping each sample's answer box
    nn, ids, _ = metrics.evaluate(lambda X: model(X)[0].float(), loader, args.device, "NN", masks)
    spectra = []  # singular values from the same decomposition, for the energy curve

    def svd_reconstruct(X):
        A, B, S = metrics.truncated_svd(X, r, args.svd_method)
        spectra.append(S)
        return A @ B

    svd, _, _ = metrics.evaluate(svd_reconstruct, loader, args.device, "SVD", masks)
    n, n_box = len(ids), sum(m is not None for m in masks.values())
    S_nn, S_svd, D = metrics.summarize(nn), metrics.summarize(svd), paired(nn, svd)
    within = sum(abs(a - b) <= 0.01 for a, b in zip(nn["cosine"], svd["cosine"])) / n
    ms = speed(model, next(iter(loader))[0].to(args.device), r, args)
    print(
        f"rank {r}, {args.split} split, n={n}, normalisation {norm}, arch {cfg.arch} (epoch {ck.epoch}), "
        f"device {args.device}, batch {args.batch_size}{lossy_note(cache_dir)}"
    )
    print_table(S_svd, S_nn, D, n_box, n)
    print(f"NN within 0.01 cosine of SVD: {100 * within:.1f}% of samples")
    ratio = ms["svd"] / ms["nn"]
    print(
        f"ms per sample (batch {args.batch_size}, median of 3 after a warm-up): SVD ({args.svd_method}) "
        f"{ms['svd']:.2f}, NN {ms['nn']:.2f}: NN "
        + (f"faster by x{ratio:.1f}" if ratio >= 1 else f"slower by x{1 / ratio:.1f}")
        + "; bench.py compares every method with the fastest exact SVD"
    )

    out = Path(args.results_dir)
    stem = output_stem(f"compare_rank{r}", args.split, args.checkpoint)
    summary = {
        "rank": r,
        "split": args.split,
        "n": n,
        "normalization": norm,
        "arch": cfg.arch,
        "checkpoint_epoch": ck.epoch,
        "device": args.device,
        "batch_size": args.batch_size,
        "svd_method": args.svd_method,
        "svd": S_svd,
        "nn": S_nn,
        "nn_minus_svd": D,
        "share_within_0.01_cosine": within,
        "ms_per_sample": ms,
        "cache_dir": str(cache_dir),
        "lossy": lossy_note(cache_dir).strip(" []"),
        "samples_with_box": n_box,
        "samples_without_box": n - n_box,
    }
    if cfg.tail_weight:
        summary["tail"] = tail_losses(model, cfg, cache_dir, idx, args)
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    write_csv(out / f"{stem}.csv", ids, svd, nn)
    energy = metrics.captured_energy(torch.cat(spectra).cpu())
    paths = plot(nn, svd, energy, S_nn=S_nn, r=r, arch=cfg.arch, stem=out / stem)
    if n_box:
        paths.append(plot_box(nn, svd, r, cfg.arch, out / stem))
    print("wrote", ", ".join(str(p) for p in [out / f"{stem}.json", out / f"{stem}.csv", *paths]))
    return summary


def speed(model, X, r, args):
    """{'svd', 'nn': ms per sample}, as bench.py measures them: one full batch, a warm-up, the median
    of 3 timed calls."""
    xb = metrics.timing_batch(X, args.batch_size)
    return {
        "svd": metrics.time_ms(lambda x: metrics.svd_reconstruct(x, r, args.svd_method), xb),
        "nn": metrics.time_ms(lambda x: model(x)[0], xb),
    }


@torch.no_grad()
def tail_losses(model, cfg, cache_dir, idx, args):
    """A run trained for the network's output (--tail_weight): its downstream loss beside SVD's at
    the same rank, (1 - final-token cosine) + (1 - saliency r) through the ViT's tail, mean over the
    samples (lower is better)."""
    target = TailTarget(cache_dir, list(idx), cfg.normalization, args.device)
    loader = make_loader(FeatureDataset(cache_dir, idx, cfg.normalization), args.batch_size)
    sums, n = {"svd": 0.0, "nn": 0.0}, 0
    for X, ids in loader:
        X = X.to(args.device)
        sums["nn"] += target.loss(model(X)[0].float(), ids).item() * len(X)
        svd = metrics.svd_reconstruct(X, cfg.rank, args.svd_method).float()
        sums["svd"] += target.loss(svd, ids).item() * len(X)
        n += len(X)
    out = {k: v / n for k, v in sums.items()}
    print(
        f"downstream loss through the ViT's tail ((1 - final-token cos) + (1 - saliency r), lower is "
        f"better): SVD {out['svd']:.4f}, NN {out['nn']:.4f}"
    )
    return out


def print_table(S_svd, S_nn, D, n_box, n):
    print(f"{'metric':<17}{'SVD':>22}{'NN':>22}{'NN - SVD (paired)':>24}")
    for k in metrics.METRICS + metrics.BOX_METRICS:
        if k == metrics.BOX_METRICS[0]:
            print(
                f"inside vs outside the answer box ({n_box} samples with a box, {n - n_box} without: skipped):"
            )

        def f(s):
            return f"{s[k]['mean']:.5f} ± {s[k]['std']:.5f}"

        print(f"{k:<17}{f(S_svd):>22}{f(S_nn):>22}{f(D):>24}")


def write_csv(path, ids, svd, nn):
    """One row per sample: every metric of SVD and of the factoriser."""
    keys = metrics.METRICS + metrics.BOX_METRICS
    header = ["sample_id"] + [f"svd_{k}" for k in keys] + [f"nn_{k}" for k in keys]
    rows = [[i] + [svd[k][j] for k in keys] + [nn[k][j] for k in keys] for j, i in enumerate(ids)]
    reports.write_csv(path, rows, header)


def plot(nn, svd, energy, *, S_nn, r, arch, stem):
    plt = pyplot()

    paths = [
        Path(f"{stem}_cosine_hist.png"),
        Path(f"{stem}_scatter.png"),
        Path(f"{stem}_energy.png"),
    ]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=150)
    lo = min(min(nn["cosine"]), min(svd["cosine"]))
    bins = torch.linspace(lo, 1, 40).tolist()
    ax.hist(svd["cosine"], bins=bins, alpha=0.6, label="truncated SVD")
    ax.hist(nn["cosine"], bins=bins, alpha=0.6, label=f"NN ({arch})")
    ax.set_xlabel(f"flattened cosine, rank {r}")
    ax.set_ylabel("samples")
    ax.legend()
    ax.set_title(
        f"Per-sample cosine, NN ({arch}) vs truncated SVD, rank {r} (n={len(nn['cosine'])})",
        fontsize=9,
    )
    save(fig, paths[0])

    fig, ax = plt.subplots(figsize=(5, 5), dpi=150)
    ax.scatter(svd["cosine"], nn["cosine"], s=10)
    a, b = min(lo, 1), 1
    ax.plot([a, b], [a, b], "k--", lw=0.8, label="NN = SVD")
    ax.plot([a, b], [a - 0.01, b - 0.01], ":", color="grey", lw=0.8, label="SVD - 0.01")
    ax.set_xlabel("SVD cosine")
    ax.set_ylabel(f"NN ({arch}) cosine")
    ax.set_title(f"per sample, rank {r}")
    ax.legend()
    save(fig, paths[1])

    plot_energy_curve(
        energy,
        paths[2],
        ranks=[r],
        points=[(r, S_nn["energy"]["mean"], f"NN ({arch}) at rank {r}")],
        title=f"Captured energy: truncated SVD curve, NN ({arch}) at rank {r}",
    )
    return paths


def plot_box(nn, svd, r, arch, stem):
    """Per sample with a box: mean token error inside the answer box vs outside, SVD and NN."""
    plt = pyplot()

    path = Path(f"{stem}_box_error.png")
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=150)
    for name, d, c in (("truncated SVD", svd, "C0"), (f"NN ({arch})", nn, "C1")):
        pts = [(o, i) for o, i in zip(d["rel_token_out"], d["rel_token_in"]) if o == o and i == i]
        ax.scatter(
            [p[0] for p in pts], [p[1] for p in pts], s=12, color=c, label=f"{name} (n={len(pts)})"
        )
    lim = ax.get_xlim()[0], max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot(lim, lim, "k--", lw=0.8, label="in = out")
    ax.set_xlabel("rel_token outside the answer box")
    ax.set_ylabel("rel_token inside the answer box")
    ax.set_title(f"Error inside vs outside the answer box, rank {r}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, path)
    return path


if __name__ == "__main__":
    run_cli(main)
