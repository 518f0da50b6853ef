"""
Is a downstream-trained factoriser's lead over SVD only a scale? (docs/results.md, "Beyond
Eckart-Young"). One scalar gain g per rank on SVD's normalised reconstruction, g picked on a grid by
the tail loss of the run's validation crops; then on its test crops the final patch-token cosine
and saliency r through the ViT's frozen tail (lowrank.tail_objective.TailTarget) of SVD, SVD x g
and the run's factoriser, with paired 95 % intervals. The runs are --runs with the rank filled in
(their block caches from their own configs).

    python docs/gain_baseline.py --runs results_vit3_tail{rank} --ranks 8,16,32
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowrank.cli import run_cli  # noqa: E402
from lowrank.feature_cache import denormalize, normalize  # noqa: E402
from lowrank.metrics import pearson, row_cosine, truncated_svd  # noqa: E402
from lowrank.runs import load_run, read_run  # noqa: E402
from lowrank.tail_objective import TailTarget  # noqa: E402

GRID = "1.0,1.1,1.2,1.3,1.4,1.5,1.6,1.8,2.0,2.2,2.4"


def scores(target, Xn_hat, batch=16):
    """[N, 2]: each crop's final patch-token cosine and saliency r against the unmodified network."""
    out = []
    with torch.no_grad():
        for b in range(0, len(Xn_hat), batch):
            X = target.tokens[b : b + batch]
            Xd = denormalize(Xn_hat[b : b + batch], X, "layernorm")
            final, saliency = target.tail(torch.cat([target.cls[b : b + batch], Xd], 1))
            for i in range(len(Xd)):
                cos = row_cosine(final[i, 1:], target.final[b + i]).mean()
                r = pearson(saliency[i : i + 1], target.saliency[b + i : b + i + 1]).squeeze()
                out.append(torch.stack([cos, r]))
    return torch.stack(out)


def svd(target, rank):
    A, B = truncated_svd(normalize(target.tokens), rank)[:2]
    return A @ B


def interval(d):
    d = np.asarray(d)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    return f"{d.mean():+.4f} [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}]"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--runs", default="results_vit3_tail{rank}", help="the runs' folders, {rank} filled in"
    )
    ap.add_argument("--ranks", default="8,16,32", help="the ranks of the runs")
    ap.add_argument("--grid", default=GRID, help="the gains tried on the validation crops")
    args = ap.parse_args(argv)
    for rank in [int(r) for r in args.ranks.split(",")]:
        run_dir = Path(args.runs.replace("{rank}", str(rank)))
        cfg, split = read_run(run_dir)
        cache = cfg.cache_dir
        val = TailTarget(cache, split["val"], "layernorm", "cpu")
        test = TailTarget(cache, split["test"], "layernorm", "cpu")
        val_svd, test_svd = svd(val, rank), svd(test, rank)
        loss = {}
        for g in [float(g) for g in args.grid.split(",")]:
            loss[g] = (2 - scores(val, g * val_svd).mean(0).sum()).item()
        g = min(loss, key=loss.get)
        model = load_run(run_dir).model
        with torch.no_grad():
            trained = torch.cat(
                [
                    model(normalize(test.tokens[b : b + 16]), rank=rank)[0]
                    for b in range(0, len(test.tokens), 16)
                ]
            )
        base, gained, ours = (
            scores(test, test_svd),
            scores(test, g * test_svd),
            scores(test, trained),
        )
        print(f"{run_dir} (rank {rank}): validation tail loss by gain "
              f"{', '.join(f'{k:g}: {v:.3f}' for k, v in loss.items())}; g = {g:g}")  # fmt: skip
        for name, m in (("svd", base), (f"svd x {g:g}", gained), ("trained downstream", ours)):
            print(f"  {name:<20} final cos {m[:, 0].mean():.4f}  saliency r {m[:, 1].mean():.4f}")
        for name, a, b in (
            ("svd x g - svd", gained, base),
            ("trained - svd", ours, base),
            ("trained - svd x g", ours, gained),
        ):
            print(
                f"  {name:<20} final {interval(a[:, 0] - b[:, 0])}  saliency r {interval(a[:, 1] - b[:, 1])}"
            )


if __name__ == "__main__":
    run_cli(main)
