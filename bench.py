"""
Quality and speed of the factorisers against truncated SVD, measured in one run on one device.

    python bench.py --results_dir results_subspace [--symmetric_dir results_symmetric] --ranks 16,32,64,128

Quality: mean flattened cosine and energy on the results directory's test split (disjoint from training).
Speed: ms per sample to produce the factors A, B at --batch_size (default 64), median of --repeats runs.
"""
import argparse
import json
import time
from pathlib import Path

import torch

import qwenvl_dataloader as qd
import svd_baseline as sb
from compare_svd_nn import load_run
from model import load_checkpoint

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results_dir", default="results", help="a trained subspace (or other nested) model")
    ap.add_argument("--symmetric_dir", default=None, help="optional: a trained symmetric model on the same split")
    ap.add_argument("--ranks", default="16,32,64,128")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--eval_cache", default=None, help="measure quality on this cache's samples instead of the "
                                                        "test split (e.g. images from other photos)")
    ap.add_argument("--max_eval", type=int, default=500)
    ap.add_argument("--out", default=None, help="JSON path (default <results_dir>/bench.json)")
    args = ap.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

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
    methods = {
        f"{cfg['arch']} (NN)": lambda x, r: model.factors(x, r),
        "torch.linalg.svd": lambda x, r: torch.linalg.svd(x, full_matrices=False),
        f"svd_baseline ({sb.DEFAULT_METHOD})": lambda x, r: sb.truncated_svd(x, r)[:2],
        "torch.svd_lowrank (q=r+8, 2 iters)": lambda x, r: torch.svd_lowrank(x, q=min(r + 8, X.shape[1]), niter=2),
    }
    sym = None
    if args.symmetric_dir:
        sym, sck = load_checkpoint(Path(args.symmetric_dir) / "best_model.pt", dev)
        methods["symmetric (NN)"] = lambda x, r: sym.factors(x)


    def ms(f, r):
        with torch.no_grad():
            f(xb, r)
            times = []
            for _ in range(args.repeats):
                sync()
                t = time.perf_counter()
                f(xb, r)
                sync()
                times.append(time.perf_counter() - t)
        return 1000 * sorted(times)[len(times) // 2] / len(xb)


    exact = {}


    def quality(name, r):
        with torch.no_grad():
            if name.startswith("symmetric"):
                if r != sym.rank:
                    return None
                Xh = torch.cat([sym(x)[0] for x in X.split(64)])
            elif name.startswith("torch.svd_lowrank"):
                U, S, V = torch.svd_lowrank(X, q=min(r + 8, X.shape[1]), niter=2)
                Xh = (U[..., :r] * S[..., None, :r]) @ V[..., :r].transpose(1, 2)
            elif name.endswith("(NN)"):
                Xh = torch.cat([torch.matmul(*model.factors(x, r)) for x in X.split(64)])
            else:  # exact truncated SVD: both exact methods give the same numbers, computed once per rank
                if r not in exact:
                    exact[r] = torch.cat([sb.svd_reconstruct(x, r) for x in X.split(64)])
                Xh = exact[r]
        m = sb.metrics(X, Xh)
        return {"cosine": m["cosine"].mean().item(), "energy": m["energy"].mean().item()}


    rows = []
    print(f"device {dev}, threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"{'evaluated' if args.eval_cache else 'test'} n={len(X)} from {cache_dir}, "
          f"model {args.results_dir} ({cfg['arch']}, trained rank {cfg['rank']})")
    print(f"{'method':<36}{'rank':>5}{'cosine':>9}{'energy':>9}{'ms/sample':>11}{'x vs linalg.svd':>17}{'x vs ' + sb.DEFAULT_METHOD:>10}")
    for r in ranks:
        t_svd = ms(methods["torch.linalg.svd"], r)
        t_fast = ms(methods[f"svd_baseline ({sb.DEFAULT_METHOD})"], r)
        for name, f in methods.items():
            if name.startswith("symmetric") and r != sym.rank:
                continue
            t = {"torch.linalg.svd": t_svd, f"svd_baseline ({sb.DEFAULT_METHOD})": t_fast}.get(name) or ms(f, r)
            q = quality(name, r)
            rows.append({"method": name, "rank": r, **q, "ms_per_sample": t, "speedup_vs_linalg_svd": t_svd / t,
                         "speedup_vs_fastest_exact": t_fast / t})
            print(f"{name:<36}{r:>5}{q['cosine']:>9.4f}{q['energy']:>9.4f}{t:>11.2f}{t_svd / t:>17.1f}{t_fast / t:>10.1f}")
    out = Path(args.out or Path(args.results_dir) / "bench.json")
    out.write_text(json.dumps({"normalization": cfg["normalization"], "device": str(dev), "threads": torch.get_num_threads(),
                               "batch_size": args.batch_size, "n_test": len(X), "cache_dir": str(cache_dir), "rows": rows},
                              indent=1))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    qd.run_cli(main)
