"""
Truncated SVD (the Eckart-Young optimum) of batches of [T, D] feature matrices, and every metric the toolkit
reports: the one place a metric is defined.

    python svd_baseline.py --cache_dir feature_cache_real --rank 128
    python svd_baseline.py --cache_dir feature_cache_real --ranks 16,32,64,128,256 --results_dir results
"""
import argparse
import json
import time
from pathlib import Path

import torch

METHODS = ("gram", "gram32", "svd", "svd_t")
DEFAULT_METHOD = "gram"  # measured in bench.py: same result as torch.linalg.svd, several times faster on CPU


def truncated_svd(X, rank, method=DEFAULT_METHOD):
    """X [B, T, D] -> A [B, T, r] = U_r Σ_r, B [B, r, D] = V_rᵀ, S [B, min(T, D)] all singular values, descending.
    Returned in X's dtype (float32 for half inputs). A @ B is the best rank-r approximation. Methods, all exact:
    'gram'   eigendecomposition of the T x T Gram matrix X Xᵀ, everything in float64 (singular values below ~1e-8 σ₁
             are lost: harmless for truncation);
    'gram32' the Gram matrix and B = U_rᵀ X as float32 matmuls, only the small eigh in float64 (fastest on CPU);
    'svd'    torch.linalg.svd of X in float64;  'svd_t' the same on Xᵀ (the faster orientation for T < D)."""
    out_dtype = X.dtype if X.dtype in (torch.float32, torch.float64) else torch.float32
    if method in ("svd", "svd_t"):
        X64 = X.double()
        if method == "svd":
            U, S, Vh = torch.linalg.svd(X64, full_matrices=False)
        else:  # Xᵀ = V S Uᵀ
            V, S, Uh = torch.linalg.svd(X64.transpose(-1, -2), full_matrices=False)
            U, Vh = Uh.transpose(-1, -2), V.transpose(-1, -2)
        A, B = U[..., :rank] * S[..., None, :rank], Vh[..., :rank, :]
    elif method in ("gram", "gram32"):
        Xw = X.double() if method == "gram" else X.float()
        w, U = torch.linalg.eigh((Xw @ Xw.transpose(-1, -2)).double())
        S = w.flip(-1).clamp_min(0).sqrt()[..., :min(X.shape[-2:])]
        U = U.flip(-1)[..., :rank]
        s = S[..., :rank]
        A = U * s[..., None, :]
        inv = torch.where(s > s[..., :1] * 1e-12, 1.0 / s, torch.zeros_like(s))  # null directions: B row 0
        B = (U.to(Xw.dtype).transpose(-1, -2) @ Xw) * inv[..., :, None].to(Xw.dtype)
    else:
        raise ValueError(f"unknown SVD method '{method}' (choose from {METHODS})")
    return A.to(out_dtype), B.to(out_dtype), S.to(out_dtype)


def time_ms(f, x, repeats=3):
    """ms per sample of f(x) for a batch x: one warm-up call, then the median of `repeats` timed calls, the device
    synchronised around each (bench.py and compare_svd_nn.py time everything this way)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.no_grad():
        f(x)
        times = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            f(x)
            sync()
            times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2] / len(x)


def svd_reconstruct(X, rank, method=DEFAULT_METHOD):
    A, B, _ = truncated_svd(X, rank, method)
    return A @ B


def singular_values(X):
    """[B, T, D] -> [B, T] singular values in float64, descending."""
    return torch.linalg.svdvals(X.double())


def captured_energy(S):
    """Singular values [..., T] -> energy captured by the best rank-k approximation for k = 1..T: Σ_{i≤k} σ² / Σ σ²."""
    e = S.double() ** 2
    return e.cumsum(-1) / e.sum(-1, keepdim=True)


# ----------------------------------------------------------------------------------------------------------------
# metrics: per sample, X and Xhat [B, T, D]; computed in float64

METRICS = ("cosine", "token_cosine", "mse", "rel_fro", "rel_token", "energy")
HIGHER_IS_BETTER = {"cosine": True, "token_cosine": True, "energy": True, "mse": False, "rel_fro": False,
                    "rel_token": False}


def metrics(X, Xhat, eps=1e-12):
    """Per-sample metrics (dict of [B] float64 tensors):
    cosine       flattened cosine between X and X̂ (for an orthogonal projection = sqrt of the captured energy)
    token_cosine mean over the T token rows of the row cosine
    mse          mean of (X - X̂)²
    rel_fro      ‖X - X̂‖_F / ‖X‖_F
    rel_token    mean over tokens of ‖x - x̂‖ / ‖x‖
    energy       1 - rel_fro²"""
    X, Xhat = X.double(), Xhat.double()
    E = X - Xhat
    dot = (X * Xhat).flatten(1).sum(1)
    nx, nh = X.flatten(1).norm(dim=1), Xhat.flatten(1).norm(dim=1)
    tok_dot = (X * Xhat).sum(-1)
    tok_nx, tok_nh = X.norm(dim=-1), Xhat.norm(dim=-1)
    rel_fro = E.flatten(1).norm(dim=1) / nx.clamp_min(eps)
    return {"cosine": dot / (nx * nh).clamp_min(eps),
            "token_cosine": (tok_dot / (tok_nx * tok_nh).clamp_min(eps)).mean(-1),
            "mse": E.pow(2).flatten(1).mean(1),
            "rel_fro": rel_fro,
            "rel_token": (E.norm(dim=-1) / tok_nx.clamp_min(eps)).mean(-1),
            "energy": 1 - rel_fro ** 2}


def token_errors(X, Xhat, eps=1e-12):
    """Per-token error maps [B, T]: ‖x - x̂‖ and cosine(x, x̂)."""
    X, Xhat = X.double(), Xhat.double()
    err = (X - Xhat).norm(dim=-1)
    cos = (X * Xhat).sum(-1) / (X.norm(dim=-1) * Xhat.norm(dim=-1)).clamp_min(eps)
    return err, cos


def principal_directions(batches, device=None):
    """Orthonormal [D, D], columns descending: the (uncentred) principal directions of all the tokens in batches of
    [B, T, D] or [T, D] features, eigenvectors of Σ XᵀX in float64. The subspace model's start, tokens.py's lrcp
    basis and compress.py's PCA codecs all use this one."""
    cov = None
    for X in batches:
        X = X.double().to(device) if device is not None else X.double()
        c = torch.einsum("...td,...te->de", X, X)
        cov = c if cov is None else cov + c
    return torch.linalg.eigh(cov)[1].flip(-1)


def scale_bbox(bbox, image_size, resized=(448, 448)):
    """[x, y, w, h] in pixels of the original image of size (W0, H0) -> the same box on the resized (W1, H1) image."""
    (W0, H0), (x, y, w, h) = image_size, bbox
    sx, sy = resized[0] / W0, resized[1] / H0
    return [x * sx, y * sy, w * sx, h * sy]


def box_mask(bbox, image_size, grid, resized):
    """The tokens whose cell overlaps an answer box: bool [H*W], token t at row t // W, column t % W.
    bbox [x, y, w, h] in pixels of the original image of size (W0, H0), scaled to the resized (W1, H1) image the
    encoder saw; cell (r, c) covers [c*W1/W, (c+1)*W1/W) x [r*H1/H, (r+1)*H1/H); a cell overlaps when the
    intersection has positive area. None when the box misses the image (or is empty): the sample has no box."""
    (W1, H1), (H, W) = resized, grid
    x, y, w, h = scale_bbox(bbox, image_size, resized)
    x0, x1 = max(0.0, x), min(float(W1), x + w)
    y0, y1 = max(0.0, y), min(float(H1), y + h)
    if x1 <= x0 or y1 <= y0:
        return None
    cw, ch = W1 / W, H1 / H
    cols = torch.arange(W, dtype=torch.float64)
    rows = torch.arange(H, dtype=torch.float64)
    cx = (cols * cw < x1) & ((cols + 1) * cw > x0)
    cy = (rows * ch < y1) & ((rows + 1) * ch > y0)
    return (cy[:, None] & cx[None, :]).flatten()


BOX_METRICS = ("rel_token_in", "rel_token_out", "token_cosine_in", "token_cosine_out")


def box_metrics(X, Xhat, mask, eps=1e-12):
    """Inside vs outside the answer box, for one sample X, X̂ [T, D] and its box mask [T] (bool): the mean over the
    box's tokens (and over the rest) of rel_token ‖x − x̂‖ / ‖x‖ and of the token cosine."""
    X, Xhat = X.double(), Xhat.double()
    rel = (X - Xhat).norm(dim=-1) / X.norm(dim=-1).clamp_min(eps)
    cos = (X * Xhat).sum(-1) / (X.norm(dim=-1) * Xhat.norm(dim=-1)).clamp_min(eps)
    out = ~mask
    return {"rel_token_in": rel[mask].mean().item(), "rel_token_out": rel[out].mean().item() if out.any() else float("nan"),
            "token_cosine_in": cos[mask].mean().item(),
            "token_cosine_out": cos[out].mean().item() if out.any() else float("nan")}


def summarize(per_sample):
    """dict of per-sample values -> {metric: {mean, std, n}} (std with Bessel's correction). NaN marks a sample the
    metric does not apply to (the box metrics of a sample without a box): left out, n counts the rest."""
    out = {}
    for k, v in per_sample.items():
        v = torch.as_tensor(v, dtype=torch.float64)
        v = v[~torch.isnan(v)]
        out[k] = {"mean": v.mean().item() if len(v) else float("nan"), "std": v.std().item() if len(v) > 1 else 0.0,
                  "n": len(v)}
    return out


def format_summary(summary, keys=METRICS):
    return "  ".join(f"{k} {summary[k]['mean']:.4f} ± {summary[k]['std']:.4f}" for k in keys if k in summary)


# ----------------------------------------------------------------------------------------------------------------
# CLI

def evaluate(reconstruct, loader, device="cpu", desc="eval", masks=None):
    """Metrics per sample of reconstruct(X) -> X̂ over a loader of (X, index); with masks ({index: answer-box token
    mask or None}) also the in-box / out-of-box metrics (NaN for a sample without a box).
    Returns (dict of lists, indices, seconds spent in reconstruct, device-synchronised)."""
    from tqdm import tqdm
    per, idx, secs = {k: [] for k in METRICS + (BOX_METRICS if masks is not None else ())}, [], 0.0
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    with torch.no_grad():
        for X, i in tqdm(loader, desc=desc, leave=False):
            X = X.to(device)
            sync()
            t = time.perf_counter()
            Xh = reconstruct(X)
            sync()
            secs += time.perf_counter() - t
            for k, v in metrics(X, Xh).items():
                per[k] += v.tolist()
            if masks is not None:
                for x, xh, j in zip(X, Xh, i.tolist()):
                    m = masks.get(j)
                    b = box_metrics(x, xh, m) if m is not None else dict.fromkeys(BOX_METRICS, float("nan"))
                    for k in BOX_METRICS:
                        per[k].append(b[k])
            idx += i.tolist()
    return per, idx, secs


def main(argv=None):
    import qwenvl_dataloader as qd
    ap = argparse.ArgumentParser(description="Truncated-SVD baseline metrics for a feature cache.",
                                 formatter_class=qd.HelpFormatter)
    ap.add_argument("--cache_dir", default="feature_cache_real", help="the feature cache")
    ap.add_argument("--rank", type=int, default=128, help="rank of the truncation (without --ranks)")
    ap.add_argument("--ranks", default=None, help="comma list for a rank sweep, e.g. 16,32,64,128,256")
    ap.add_argument("--split", default="all", choices=["all", "train", "val", "test"],
                    help="samples to use; a split needs split.json in --results_dir (written by training)")
    ap.add_argument("--results_dir", default="results", help="where split.json is read and the sweep plot written")
    ap.add_argument("--num_samples", type=int, default=None, help="first N samples (default: all)")
    ap.add_argument("--normalize", default="layernorm", choices=qd.NORMALIZATIONS, help="as in training")
    ap.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS, help="exact truncated SVD method")
    ap.add_argument("--batch_size", type=int, default=32, help="samples per batch")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    args = ap.parse_args(argv)

    if args.split == "all":
        idx = qd.cached_indices(args.cache_dir)
    else:
        p = Path(args.results_dir) / "split.json"
        if not p.exists():
            raise qd.UserError(f"{p} not found: train first (python train_real_data.py --results_dir "
                             f"{args.results_dir}) or use --split all")
        idx = json.loads(p.read_text())[args.split]
    idx = idx[: args.num_samples] if args.num_samples else idx
    tokens = min(qd.cached_shape(args.cache_dir))
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else [args.rank]
    for r in ranks:
        qd.check_rank(r, tokens, "--ranks" if args.ranks else "--rank")
    ds = qd.FeatureDataset(args.cache_dir, idx, args.normalize)
    loader = qd.make_loader(ds, args.batch_size)
    print(f"cache {args.cache_dir}: {len(ds)} samples ({args.split}), normalisation {args.normalize}, "
          f"method {args.method}, device {args.device}{qd.lossy_note(args.cache_dir)}")
    if not args.ranks:
        per, _, secs = evaluate(lambda X: svd_reconstruct(X, args.rank, args.method), loader, args.device, "svd")
        s = summarize(per)
        print(f"SVD rank {args.rank} (n={len(ds)}): {format_summary(s)}")
        print(f"{1000 * secs / len(ds):.2f} ms per sample")
        return s
    S = torch.cat([singular_values(X.to(args.device)).cpu() for X, _ in loader])
    energy = captured_energy(S)  # [N, min(T, D)]
    print(f"{'rank':>5} {'energy':>16} {'cosine':>16}")
    rows = []
    for r in ranks:
        e = energy[:, min(r, energy.shape[1]) - 1]
        rows.append({"rank": r, "energy_mean": e.mean().item(), "energy_std": e.std().item(),
                     "cosine_mean": e.sqrt().mean().item(), "cosine_std": e.sqrt().std().item()})
        print(f"{r:>5} {e.mean():.4f} ± {e.std():.4f} {e.sqrt().mean():.4f} ± {e.sqrt().std():.4f}")
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "svd_rank_sweep.json").write_text(json.dumps({"n": len(ds), "normalization": args.normalize,
                                                         "split": args.split, "rows": rows}, indent=1))
    plot_energy_curve(energy, out / "svd_energy_vs_rank.png", ranks=ranks,
                      title=f"Truncated SVD, {args.cache_dir} ({args.split}, n={len(ds)}, {args.normalize})")
    print(f"wrote {out / 'svd_rank_sweep.json'} and {out / 'svd_energy_vs_rank.png'}")
    return rows


def plot_energy_curve(energy, path, ranks=(), points=(), title="Energy captured by truncated SVD"):
    """Mean captured energy vs rank (band: ± 1 std over samples); points: [(rank, energy, label)] to overlay."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = torch.arange(1, energy.shape[1] + 1)
    m, s = energy.mean(0), energy.std(0) if len(energy) > 1 else torch.zeros(energy.shape[1])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=150)
    ax.plot(k, m, label=f"truncated SVD (mean of {len(energy)})")
    ax.fill_between(k, m - s, (m + s).clamp(max=1), alpha=0.25, label="± 1 std over samples")
    for r in ranks:
        ax.axvline(r, color="grey", lw=0.5, ls=":")
        e = m[min(r, len(m)) - 1].item()
        ax.annotate(f"r={r}: {e:.4f}", (r, e), textcoords="offset points", xytext=(3, -12), fontsize=7)
    for r, e, label in points:
        ax.plot([r], [e], "o", color="C3", label=label)
    ax.set_xlabel("rank r")
    ax.set_ylabel("captured energy 1 - rel_fro²")
    ax.set_xscale("log", base=2)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    import qwenvl_dataloader as qd
    qd.run_cli(main)
