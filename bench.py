"""
Quality and speed of the factorisers against truncated SVD, measured in one run on one device.

    python bench.py --results_dir results_subspace [--symmetric_dir results_symmetric] --ranks 16,32,64,128

Quality: mean flattened cosine and energy on the results directory's test split (disjoint from
training). Peers at equal cost, at each rank: torch.svd_lowrank and our own randomized range finder
(a Gaussian Ω through the model's own code), each with the model's oversampling and power steps at
that rank, so each makes as many products with X. --ablation adds the table start (learned Ω / the
training split's principal directions / Gaussian) x oversampling (0, 8, 16) x power steps (0, 1, 2):
gap to SVD and ms per sample for each. Speed: ms per sample to produce the factors A, B at
--batch_size (default 64), median of --repeats runs after a warm-up, against the fastest exact
truncated SVD at each rank (torch.linalg.svd on X and on Xᵀ, and the Gram methods of metrics.py;
each one's largest relative deviation from torch.linalg.svd in float64 over the evaluated images is
printed, and the fastest of those within 1e-5 is the named yardstick) and against the floor of one
GEMM X·W with W [D, r]. --profile prints torch.profiler's breakdown of the factoriser's call at each
rank.
"""

import argparse
import json
from pathlib import Path

import torch

from lowrank import metrics
from lowrank.cli import (
    HelpFormatter,
    UserError,
    add_device,
    out_file,
    parse_ranks,
    pick_device,
    positive_int,
    run_cli,
)
from lowrank.dataset import FeatureDataset, principal_basis
from lowrank.feature_cache import cached_indices, cached_shape, load_manifest, lossy_note
from lowrank.model import ARCH_DEFAULTS, Subspace, load_checkpoint
from lowrank.runs import BEST, load_run, read_split

# an exact method is a yardstick only within this relative distance of float64 SVD on the data
EXACT_TOL = 1e-5


def model_options(cfg):
    """The options the model runs with (the checkpoint's, defaults filled in)."""
    return dict(ARCH_DEFAULTS.get(cfg.arch, {}), **cfg.arch_options)


def profile(f, x, title, rows=8):
    """torch.profiler's operators of one call f(x) (after a warm-up), by self time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with torch.no_grad():
        f(x)
        with prof(activities=acts) as p:
            f(x)
            if x.is_cuda:
                torch.cuda.synchronize()
    key = "self_device_time_total" if x.is_cuda else "self_cpu_time_total"
    print(f"profile: {title}, batch {len(x)}")
    print(p.key_averages().table(sort_by=key, row_limit=rows))


def get_args_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument(
        "--results_dir", default="results", help="a trained subspace (or other nested) model"
    )
    ap.add_argument(
        "--symmetric_dir",
        default=None,
        help="optional: a trained symmetric model on the same split",
    )
    ap.add_argument(
        "--ranks",
        default="16,32,64,128",
        help="ranks to measure, each at most the model's trained rank",
    )
    ap.add_argument("--batch_size", type=positive_int, default=64, help="batch used for timing")
    ap.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        help="timed calls per measurement (median, after a warm-up)",
    )
    add_device(ap)
    ap.add_argument(
        "--eval_cache",
        default=None,
        help="measure quality on this cache's samples instead of the test split (e.g. images from other photos)",
    )
    ap.add_argument(
        "--max_eval", type=positive_int, default=500, help="at most this many --eval_cache samples"
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="print torch.profiler's top operators of the factoriser's call at each rank (one timed batch)",
    )
    ap.add_argument(
        "--ablation",
        action="store_true",
        help="subspace: also time and score every start x oversampling x power steps at each rank",
    )
    ap.add_argument("--out", default=None, help="JSON path (default <results_dir>/bench.json)")
    return ap


def symmetric_model(results_dir, dev):
    """--symmetric_dir: a run of the symmetric network (the original's design), shown beside the
    subspace model."""
    model, ck = load_checkpoint(Path(results_dir) / BEST, dev)
    arch = ck.config.get("arch")
    if arch != "symmetric":
        raise UserError(
            f"--symmetric_dir {results_dir} holds a {arch} run; give a run trained with --arch symmetric"
        )
    return model


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    out = out_file(args.out or Path(args.results_dir) / "bench.json", "--out")
    dev = pick_device(args.device)
    run = load_run(args.results_dir, device=dev)
    model, cfg, test_idx, cache_dir = run.model, run.config, run.indices, run.cache_dir
    ranks = parse_ranks(args.ranks, min(cfg.shape))
    if args.ablation and cfg.arch != "subspace":
        raise UserError(
            f"--ablation varies a subspace model's start and steps; {args.results_dir} holds {cfg.arch}"
        )
    check_ranks(ranks, cfg, args.results_dir)
    cache_dir, X = eval_features(args, cfg, cache_dir, test_idx, dev)
    xb = metrics.timing_batch(X, args.batch_size)
    T, D = X.shape[1:]
    sym = symmetric_model(args.symmetric_dir, dev) if args.symmetric_dir else None
    bench = Bench(X, model, sym, cfg.arch, ranks)
    features = load_manifest(cache_dir).encoder.model
    print(
        f"device {dev}, threads {torch.get_num_threads()}, batch {args.batch_size}, float32, "
        f"{'evaluated' if args.eval_cache else 'test'} n={len(X)} [{T}, {D}] from {cache_dir} "
        f"({cfg.normalization}), model {args.results_dir} ({cfg.arch}, trained rank {cfg.rank}, "
        f"options {model_options(cfg)}); features: {features}; ms: "
        f"median of {args.repeats} after a warm-up{lossy_note(cache_dir)}"
    )
    print(
        f"{'method':<36}{'rank':>5}{'cosine':>9}{'gap':>9}{'worst gap':>10}{'energy':>8}{'ms/sample':>10}"
        f"{'x svd_lowrank':>14}{'x fastest exact':>16}{'x GEMM floor':>13}{'dev. vs fp64 SVD':>17}"
    )
    rows = []
    for r in ranks:
        rows += bench.rank_rows(r, xb, args.repeats)
        if args.profile:
            profile(lambda x: model.factors(x, r), xb, f"{cfg.arch} factors at rank {r}")
    print(
        f"* the fastest exact truncated SVD at that rank among those within {EXACT_TOL:g} of float64 SVD (dev.): "
        "the yardstick of 'x fastest exact'. same o, p: q = rank + the model's oversampling at that rank, niter = its "
        "power steps (as many products with X). gap: cosine minus "
        "exact SVD's, mean over images; worst gap: the lowest image's; dev.: largest relative Frobenius distance of "
        "an image's rank-r reconstruction from torch.linalg.svd's in float64"
    )
    ablation = (
        bench.ablation(ranks, xb, args.repeats, args.results_dir, cfg) if args.ablation else None
    )
    out.write_text(
        json.dumps(
            {
                "normalization": cfg.normalization,
                "device": str(dev),
                "threads": torch.get_num_threads(),
                "shape": [T, D],
                "arch": cfg.arch,
                "arch_options": model_options(cfg),
                "features": features,
                "batch_size": args.batch_size,
                "n_test": len(X),
                "cache_dir": str(cache_dir),
                "rows": rows,
                **({"ablation": ablation} if ablation is not None else {}),
            },
            indent=1,
        )
    )
    print(f"wrote {out}")
    return rows


def check_ranks(ranks, cfg, results_dir):
    """A subspace model serves every rank up to its own; symmetric only its own."""
    nested = cfg.arch != "symmetric"
    bad = [r for r in ranks if not (1 <= r <= cfg.rank if nested else r == cfg.rank)]
    if bad:
        serves = (
            f"ranks 1..{cfg.rank} (its trained rank)"
            if nested
            else f"only its trained rank {cfg.rank}"
        )
        raise UserError(
            f"--ranks {','.join(map(str, bad))}: the model in {results_dir} serves {serves}; train at a higher "
            f"--rank to bench higher ranks"
        )


def eval_features(args, cfg, cache_dir, test_idx, dev):
    """-> (the cache measured, its normalised features [N, T, D] on dev): the run's test split, or
    the first --max_eval of --eval_cache."""
    if args.eval_cache:
        cache_dir, test_idx = args.eval_cache, cached_indices(args.eval_cache)[: args.max_eval]
        if cached_shape(cache_dir) != cfg.shape:
            raise UserError(
                f"--eval_cache {cache_dir} holds {list(cached_shape(cache_dir))} features; the model was trained on "
                f"{list(cfg.shape)}"
            )
    X = torch.stack([x for x, _ in FeatureDataset(cache_dir, test_idx, cfg.normalization)])
    return cache_dir, X.to(dev)


def linalg_svd(x, r, transposed=False):
    """Rank-r factors from torch.linalg.svd of X, or of Xᵀ = V S Uᵀ (the faster orientation for T <
    D)."""
    if transposed:
        V, S, Uh = torch.linalg.svd(x.transpose(1, 2), full_matrices=False)
        return Uh[:, :r].transpose(1, 2) * S[:, None, :r], V[..., :r].transpose(1, 2)
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    return U[..., :r] * S[:, None, :r], Vh[:, :r]


# every exact truncated SVD we have, each returning (A, B); the fastest at each rank is the
# yardstick
EXACT = {
    "torch.linalg.svd(X)": linalg_svd,
    "torch.linalg.svd(Xᵀ)": lambda x, r: linalg_svd(x, r, transposed=True),
    "svd_baseline gram (fp64)": lambda x, r: metrics.truncated_svd(x, r, "gram")[:2],
    "svd_baseline gram32": lambda x, r: metrics.truncated_svd(x, r, "gram32")[:2],
}


def svd_lowrank(x, r, oversample, power_iters):
    U, S, V = torch.svd_lowrank(x, q=min(r + oversample, *x.shape[1:]), niter=power_iters)
    return U[..., :r] * S[..., None, :r], V[..., :r].transpose(1, 2)


def range_finder(omega, rank, setting, tokens):
    """A Subspace with the given Ω and one (oversample, power steps) setting at every rank."""
    o, p = setting
    m = Subspace(rank, tokens=tokens, dim=omega.shape[0], schedule=[[1 << 30, o, p]]).to(
        omega.device
    )
    with torch.no_grad():
        m.omega = torch.nn.Parameter(omega[:, : m.omega.shape[1]].clone())
    return m


LOWRANK = "torch.svd_lowrank, same o, p"
ABLATION = [(o, p) for o in (0, 8, 16) for p in (0, 1, 2)]


class Bench:
    """Quality and speed of every method on the features X at one rank, against float64 SVD's
    truth."""

    def __init__(self, X, model, sym, arch, ranks):
        self.X, self.model, self.sym = X, model, sym
        with torch.no_grad():  # the truth for the exact methods: torch.linalg.svd in float64
            self.U64, self.S64, self.Vh64 = torch.linalg.svd(X.double(), full_matrices=False)
        self.arch = arch
        # symmetric: the old peer
        setting = model.setting if hasattr(model, "setting") else lambda r: (8, 2)
        D = X.shape[2]
        gauss = torch.randn(
            D, min(X.shape[1], max(ranks) + 16), generator=torch.Generator().manual_seed(0)
        )
        self.gauss = (gauss / D**0.5).to(X.device)
        self.peers = {
            r: range_finder(self.gauss, r, setting(r), X.shape[1]) for r in ranks
        }  # built once, outside the timing
        self.approx = {
            f"{arch} (NN)": lambda x, r: model.factors(x, r),
            LOWRANK: lambda x, r: svd_lowrank(x, r, *setting(r)),
            "Gaussian range finder, same o, p": lambda x, r: self.peers[r].factors(x, r),
        }
        if sym is not None:
            self.approx["symmetric (NN)"] = lambda x, r: sym.factors(x)
        self.W = {r: torch.randn(D, r, device=X.device) for r in ranks}

    def ablation(self, ranks, xb, repeats, results_dir, cfg):
        """Every start x (oversample, power steps) at each rank: gap to SVD (mean, worst) and ms per
        sample."""
        starts = {
            "learned": self.model.omega.detach(),
            "principal": principal_basis(
                cfg.cache_dir, read_split(results_dir)["train"], cfg.normalization
            )
            .float()
            .to(self.X.device),
            "Gaussian": self.gauss,
        }
        print(f"ablation: start x oversampling x power steps ({self.arch}, the default marked <-)")
        print(
            f"{'start':<11}{'o':>3}{'p':>3}"
            + "".join(f"{f'rank {r}: gap / worst / ms':>30}" for r in ranks)
        )
        rows = []
        for name, omega in starts.items():
            for o, p in ABLATION:
                row = {"start": name, "oversample": o, "power_iters": p, "ranks": {}}
                line = f"{name:<11}{o:>3}{p:>3}"
                for r in ranks:
                    if omega.shape[1] < min(r + o, self.X.shape[1]):
                        line += f"{'(Ω too narrow)':>30}"
                        continue
                    m = range_finder(omega, r, (o, p), self.X.shape[1])

                    def f(x, r):
                        return m.factors(x, r)

                    gap = self.quality(f, r)["cosine"] - self.svd_quality(r)["cosine"]
                    t = metrics.time_ms(lambda x: f(x, r), xb, repeats)
                    default = name == "learned" and (o, p) == tuple(self.model.setting(r))
                    row["ranks"][r] = {
                        "gap": gap.mean().item(),
                        "worst_gap": gap.min().item(),
                        "ms": t,
                    }
                    row["ranks"][r]["default"] = default
                    line += f"{gap.mean():>10.4f} /{gap.min():>8.4f} /{t:>6.2f}{' <-' if default else '   '}"
                print(line)
                rows.append(row)
        return rows

    def svd_quality(self, r):
        return metrics.metrics(self.X, self.truth(r).to(self.X.dtype))

    def truth(self, r):
        return (self.U64[..., :r] * self.S64[:, None, :r]) @ self.Vh64[:, :r]

    def quality(self, f, r):
        """Per-image metrics of the rank-r reconstruction A·B of factors f(x, r)."""
        with torch.no_grad():
            return metrics.metrics(
                self.X, torch.cat([torch.matmul(*f(x, r)) for x in self.X.split(64)])
            )

    def deviation(self, f, r):
        """max over images of ‖f's rank-r X̂ - float64 SVD's‖ / ‖float64 SVD's‖"""
        truth_r = self.truth(r)
        with torch.no_grad():
            got = torch.cat([torch.matmul(*f(x, r)) for x in self.X.split(64)]).double()
        return ((got - truth_r).norm(dim=(1, 2)) / truth_r.norm(dim=(1, 2))).max().item()

    def rank_rows(self, r, xb, repeats):
        """Time and score every method at rank r; print one line each -> the rows."""
        approx = {
            name: f
            for name, f in self.approx.items()
            if not (name == "symmetric (NN)" and self.sym is not None and r != self.sym.rank)
        }
        calls = {name: (lambda x, f=f: f(x, r)) for name, f in {**EXACT, **approx}.items()}
        # in turns
        times = metrics.time_all({**calls, "floor": lambda x: x @ self.W[r]}, xb, repeats)
        t_floor = times.pop("floor")  # one GEMM X·W: the least any costs
        t_exact = {name: times[name] for name in EXACT}
        devs = {name: self.deviation(f, r) for name, f in EXACT.items()}
        exact_enough = [n for n in t_exact if devs[n] <= EXACT_TOL] or list(t_exact)
        # the yardstick: fastest of those within EXACT_TOL
        fastest = min(exact_enough, key=t_exact.get)
        svd_q = self.svd_quality(r)  # exact SVD's quality, from float64 SVD
        quals = {name: svd_q for name in EXACT} | {
            name: self.quality(f, r) for name, f in approx.items()
        }
        times["GEMM floor X·W"], quals["GEMM floor X·W"] = t_floor, None
        rows = []
        for name, t in times.items():
            q = quals[name]
            row = {
                "method": name,
                "rank": r,
                "ms_per_sample": t,
                "speedup_vs_linalg_svd": t_exact["torch.linalg.svd(X)"] / t,
                "speedup_vs_svd_lowrank": times[LOWRANK] / t,
                "speedup_vs_fastest_exact": t_exact[fastest] / t,
                "fastest_exact": fastest,
                "x_gemm_floor": t / t_floor,
            }
            if q is not None:
                gap = q["cosine"] - svd_q["cosine"]
                row.update(
                    cosine=q["cosine"].mean().item(),
                    energy=q["energy"].mean().item(),
                    gap=gap.mean().item(),
                    worst_gap=gap.min().item(),
                )
            if name in devs:
                row["max_rel_dev_vs_fp64_svd"] = devs[name]
            rows.append(row)
            qs = (
                f"{row['cosine']:>9.4f}{row['gap']:>9.4f}{row['worst_gap']:>10.4f}{row['energy']:>8.4f}"
                if q is not None
                else f"{'':>36}"
            )
            label = name + (" *" if name == fastest else "")
            print(
                f"{label:<36}{r:>5}{qs}{t:>10.2f}{row['speedup_vs_svd_lowrank']:>14.2f}"
                f"{row['speedup_vs_fastest_exact']:>16.2f}{row['x_gemm_floor']:>13.1f}"
                + (f"{devs[name]:>17.1e}" if name in devs else "")
            )
        return rows


if __name__ == "__main__":
    run_cli(main)
