"""
Quality and speed of the factorisers against truncated SVD, measured in one run on one device.

    python bench.py --results_dir results_subspace [--symmetric_dir results_symmetric] --ranks 16,32,64,128

Quality: mean flattened cosine and energy on the results directory's test split (disjoint from training).
Speed: ms per sample to produce the factors A, B at --batch_size (default 64), median of --repeats runs after a
warm-up, against the fastest exact truncated SVD at each rank (torch.linalg.svd on X and on Xᵀ, and
svd_baseline's Gram methods; the fastest is named) and against the floor of one GEMM X·W with W [D, r].
"""
import argparse
import json
from pathlib import Path

import torch

import qwenvl_dataloader as qd
import svd_baseline as sb
from compare_svd_nn import load_run
from model import load_checkpoint

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
    exact = {  # every exact truncated SVD we have; the fastest at each rank is the yardstick
        "torch.linalg.svd(X)": lambda x, r: torch.linalg.svd(x, full_matrices=False),
        "torch.linalg.svd(Xᵀ)": lambda x, r: torch.linalg.svd(x.transpose(1, 2), full_matrices=False),
        "svd_baseline gram (fp64)": lambda x, r: sb.truncated_svd(x, r, "gram")[:2],
        "svd_baseline gram32": lambda x, r: sb.truncated_svd(x, r, "gram32")[:2],
    }
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
          f"options {cfg.get('arch_options', {})}); ms: median of {args.repeats} after a warm-up"
          f"{qd.lossy_note(cache_dir)}")
    head = (f"{'method':<36}{'rank':>5}{'cosine':>9}{'gap':>9}{'worst gap':>10}{'energy':>8}{'ms/sample':>10}"
            f"{'x linalg.svd(X)':>16}{'x fastest exact':>16}{'x GEMM floor':>13}")
    print(head)
    for r in ranks:
        t_exact = {name: sb.time_ms(lambda x: f(x, r), xb, args.repeats) for name, f in exact.items()}
        fastest = min(t_exact, key=t_exact.get)
        t_floor = sb.time_ms(lambda x: floor(x, r), xb, args.repeats)
        svd_q = per_image(lambda x: sb.svd_reconstruct(x, r))
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
            rows.append(row)
            qs = (f"{row['cosine']:>9.4f}{row['gap']:>9.4f}{row['worst_gap']:>10.4f}{row['energy']:>8.4f}" if q is not None
                  else f"{'':>36}")
            label = name + (" *" if name == fastest else "")
            print(f"{label:<36}{r:>5}{qs}{t:>10.2f}{row['speedup_vs_linalg_svd']:>16.1f}"
                  f"{row['speedup_vs_fastest_exact']:>16.2f}{row['x_gemm_floor']:>13.1f}")
    print("* the fastest exact truncated SVD at that rank: the yardstick of 'x fastest exact'. gap: cosine minus "
          "exact SVD's, mean over images; worst gap: the lowest image's")
    out = Path(args.out or Path(args.results_dir) / "bench.json")
    out.write_text(json.dumps({"normalization": cfg["normalization"], "device": str(dev), "threads": torch.get_num_threads(),
                               "shape": [T, D], "arch": cfg["arch"], "arch_options": cfg.get("arch_options", {}),
                               "batch_size": args.batch_size, "n_test": len(X), "cache_dir": str(cache_dir), "rows": rows},
                              indent=1))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    qd.run_cli(main)
