"""
Quality and speed of the factorisers against truncated SVD, measured in one run on one device.

    python bench.py --results_dir results_subspace [--symmetric_dir results_symmetric] --ranks 16,32,64,128

Quality: mean flattened cosine and energy on the results directory's test split (disjoint from training).
Speed: ms per sample to produce the factors A, B at --batch_size (default 64), median of --repeats runs after a
warm-up, against the fastest exact truncated SVD at each rank (torch.linalg.svd on X and on Xᵀ, and
svd_baseline's Gram methods; each one's largest relative deviation from torch.linalg.svd in float64 over the
evaluated images is printed, and the fastest of those within 1e-5 is the named yardstick) and against the floor of one GEMM X·W with
W [D, r]. --profile prints torch.profiler's breakdown of the factoriser's call at each rank.
"""
import argparse
import json
from pathlib import Path

import torch

import qwenvl_dataloader as qd
import svd_baseline as sb
from compare_svd_nn import load_run
from model import ARCH_DEFAULTS, load_checkpoint

EXACT_TOL = 1e-5  # an exact method is a yardstick only within this relative distance of float64 SVD on the data


def model_options(cfg):
    """The options the model runs with (the checkpoint's, defaults filled in)."""
    return dict(ARCH_DEFAULTS.get(cfg["arch"], {}), **cfg.get("arch_options", {}))


def profile(f, x, title, rows=8):
    """torch.profiler's operators of one call f(x) (after a warm-up), by self time."""
    from torch.profiler import ProfilerActivity, profile as prof
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=qd.HelpFormatter)
    ap.add_argument("--results_dir", default="results", help="a trained subspace (or other nested) model")
    ap.add_argument("--symmetric_dir", default=None, help="optional: a trained symmetric model on the same split")
    ap.add_argument("--ranks", default="16,32,64,128", help="ranks to measure, each at most the model's trained rank")
    ap.add_argument("--batch_size", type=int, default=64, help="batch used for timing")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median, after a warm-up)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    ap.add_argument("--eval_cache", default=None, help="measure quality on this cache's samples instead of the "
                                                        "test split (e.g. images from other photos)")
    ap.add_argument("--max_eval", type=int, default=500, help="at most this many --eval_cache samples")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of the factoriser's "
                                                           "call at each rank (one timed batch)")
    ap.add_argument("--out", default=None, help="JSON path (default <results_dir>/bench.json)")
    args = ap.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    dev = torch.device(args.device)

    model, ck, cfg, test_idx, cache_dir = load_run(args.results_dir, device=dev)
    bad = [r for r in ranks if not 1 <= r <= cfg["rank"]]
    if bad:
        raise qd.UserError(f"--ranks {','.join(map(str, bad))}: the model in {args.results_dir} serves ranks "
                         f"1..{cfg['rank']} (its trained rank); train at a higher --rank to bench higher ranks")
    if args.eval_cache:
        cache_dir, test_idx = args.eval_cache, qd.cached_indices(args.eval_cache)[: args.max_eval]
    X = torch.stack([x for x, _ in qd.FeatureDataset(cache_dir, test_idx, cfg["normalization"])]).to(dev)
    xb = X[: args.batch_size]
    if len(xb) < args.batch_size:  # time a full batch even on a small test split
        xb = xb.repeat((args.batch_size + len(xb) - 1) // len(xb), 1, 1)[: args.batch_size]
    T, D = X.shape[1:]
    def linalg_svd(x, r, transposed=False):
        if transposed:  # Xᵀ = V S Uᵀ
            V, S, Uh = torch.linalg.svd(x.transpose(1, 2), full_matrices=False)
            return Uh[:, :r].transpose(1, 2) * S[:, None, :r], V[..., :r].transpose(1, 2)
        U, S, Vh = torch.linalg.svd(x, full_matrices=False)
        return U[..., :r] * S[:, None, :r], Vh[:, :r]

    exact = {  # every exact truncated SVD we have, each returning (A, B); the fastest at each rank is the yardstick
        "torch.linalg.svd(X)": linalg_svd,
        "torch.linalg.svd(Xᵀ)": lambda x, r: linalg_svd(x, r, transposed=True),
        "svd_baseline gram (fp64)": lambda x, r: sb.truncated_svd(x, r, "gram")[:2],
        "svd_baseline gram32": lambda x, r: sb.truncated_svd(x, r, "gram32")[:2],
    }
    with torch.no_grad():  # the truth for the exact methods: torch.linalg.svd in float64
        U64, S64, Vh64 = torch.linalg.svd(X.double(), full_matrices=False)

    def truth(r):
        return (U64[..., :r] * S64[:, None, :r]) @ Vh64[:, :r]

    def deviation(f, r):
        """max over images of ‖f's rank-r X̂ - float64 SVD's‖ / ‖float64 SVD's‖"""
        truth_r = truth(r)
        with torch.no_grad():
            got = torch.cat([torch.matmul(*f(x, r)) for x in X.split(64)]).double()
        return ((got - truth_r).norm(dim=(1, 2)) / truth_r.norm(dim=(1, 2))).max().item()
    approx = {
        f"{cfg['arch']} (NN)": lambda x, r: model.factors(x, r),
        "torch.svd_lowrank (q=r+8, 2 iters)": lambda x, r: torch.svd_lowrank(x, q=min(r + 8, T), niter=2),
    }
    sym = None
    if args.symmetric_dir:
        sym, sck = load_checkpoint(Path(args.symmetric_dir) / "best_model.pt", dev)
        approx["symmetric (NN)"] = lambda x, r: sym.factors(x)
    W = {r: torch.randn(D, r, device=dev) for r in ranks}
    floor = lambda x, r: x @ W[r]  # one GEMM X·W, W [D, r]: the least any rank-r factoriser of X can cost

    def reconstruct(name, x, r):
        if name.startswith("symmetric"):
            return sym(x)[0]
        if name.startswith("torch.svd_lowrank"):
            U, S, V = torch.svd_lowrank(x, q=min(r + 8, T), niter=2)
            return (U[..., :r] * S[..., None, :r]) @ V[..., :r].transpose(1, 2)
        return torch.matmul(*model.factors(x, r))

    def per_image(f):
        with torch.no_grad():
            return sb.metrics(X, torch.cat([f(x) for x in X.split(64)]))

    rows = []
    print(f"device {dev}, threads {torch.get_num_threads()}, batch {args.batch_size}, float32, "
          f"{'evaluated' if args.eval_cache else 'test'} n={len(X)} [{T}, {D}] from {cache_dir} "
          f"({cfg['normalization']}), model {args.results_dir} ({cfg['arch']}, trained rank {cfg['rank']}, "
          f"options {model_options(cfg)}); features: {qd.read_manifest(cache_dir)['encoder']['model']}; ms: "
          f"median of {args.repeats} after a warm-up{qd.lossy_note(cache_dir)}")
    head = (f"{'method':<36}{'rank':>5}{'cosine':>9}{'gap':>9}{'worst gap':>10}{'energy':>8}{'ms/sample':>10}"
            f"{'x linalg.svd(X)':>16}{'x fastest exact':>16}{'x GEMM floor':>13}{'dev. vs fp64 SVD':>17}")
    print(head)
    for r in ranks:
        t_exact = {name: sb.time_ms(lambda x: f(x, r), xb, args.repeats) for name, f in exact.items()}
        devs = {name: deviation(f, r) for name, f in exact.items()}
        exact_enough = [n for n in t_exact if devs[n] <= EXACT_TOL] or list(t_exact)
        fastest = min(exact_enough, key=t_exact.get)  # the yardstick: fastest of those within EXACT_TOL
        t_floor = sb.time_ms(lambda x: floor(x, r), xb, args.repeats)
        svd_q = sb.metrics(X, truth(r).to(X.dtype))  # exact SVD's quality, from the float64 SVD above
        times = dict(t_exact)
        quals = {name: svd_q for name in exact}
        for name, f in approx.items():
            if name.startswith("symmetric") and r != sym.rank:
                continue
            times[name] = sb.time_ms(lambda x: f(x, r), xb, args.repeats)
            quals[name] = per_image(lambda x: reconstruct(name, x, r))
        times["GEMM floor X·W"], quals["GEMM floor X·W"] = t_floor, None
        for name, t in times.items():
            q = quals[name]
            row = {"method": name, "rank": r, "ms_per_sample": t, "speedup_vs_linalg_svd": t_exact["torch.linalg.svd(X)"] / t,
                   "speedup_vs_fastest_exact": t_exact[fastest] / t, "fastest_exact": fastest, "x_gemm_floor": t / t_floor}
            if q is not None:
                gap = q["cosine"] - svd_q["cosine"]
                row.update(cosine=q["cosine"].mean().item(), energy=q["energy"].mean().item(),
                           gap=gap.mean().item(), worst_gap=gap.min().item())
            if name in devs:
                row["max_rel_dev_vs_fp64_svd"] = devs[name]
            rows.append(row)
            qs = (f"{row['cosine']:>9.4f}{row['gap']:>9.4f}{row['worst_gap']:>10.4f}{row['energy']:>8.4f}" if q is not None
                  else f"{'':>36}")
            label = name + (" *" if name == fastest else "")
            print(f"{label:<36}{r:>5}{qs}{t:>10.2f}{row['speedup_vs_linalg_svd']:>16.1f}"
                  f"{row['speedup_vs_fastest_exact']:>16.2f}{row['x_gemm_floor']:>13.1f}"
                  + (f"{devs[name]:>17.1e}" if name in devs else ""))
        if args.profile:
            profile(lambda x: model.factors(x, r), xb, f"{cfg['arch']} factors at rank {r}")
    print(f"* the fastest exact truncated SVD at that rank among those within {EXACT_TOL:g} of float64 SVD (dev.): "
          "the yardstick of 'x fastest exact'. gap: cosine minus "
          "exact SVD's, mean over images; worst gap: the lowest image's; dev.: largest relative Frobenius distance of "
          "an image's rank-r reconstruction from torch.linalg.svd's in float64")
    out = Path(args.out or Path(args.results_dir) / "bench.json")
    out.write_text(json.dumps({"normalization": cfg["normalization"], "device": str(dev), "threads": torch.get_num_threads(),
                               "shape": [T, D], "arch": cfg["arch"], "arch_options": model_options(cfg),
                               "features": qd.read_manifest(cache_dir)["encoder"]["model"],
                               "batch_size": args.batch_size, "n_test": len(X), "cache_dir": str(cache_dir), "rows": rows},
                              indent=1))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    qd.run_cli(main)
