"""
Token-merging rules: k tokens that stand for all T of an image, each the mean of a group of tokens,
placed at one representative token's position. A rule returns (W [k, T], representatives [k]): row i
of W averages the tokens of group i (weights summing to 1), so the merged tokens are W @ X, in the
order of their representatives.

    pool       average pooling of the H×W token grid to gh×gw = k cells (adaptive pooling's bins);
               the representative is each cell's centre token (VTC-Bench, arXiv 2510.07143, finds
               plain downsampling hard to beat)
    tome       ToMe's bipartite soft matching (arXiv 2210.09461), repeated until k remain: tokens
               alternate between sets A and B, each A token's most similar B token (cosine) is its
               edge, the most similar edges merge, size-weighted means; the B token is the
               representative
    visionzip  VisionZip (arXiv 2412.04467): the "dominant" tokens receiving the most attention in
               the vision tower, plus a few "contextual" tokens: the rest merged into clusters
               around evenly spaced targets, each token joining its most similar target (cosine)
"""

import math

import torch
import torch.nn.functional as F

from lowrank.selection import Rule

CONTEXTUAL_SHARE = 10 / 64  # VisionZip's split of a 64-token budget: 54 dominant + 10 contextual


def pool_shape(hw, k):
    """(gh, gw) with gh * gw = k, gh <= H, gw <= W and gh / gw closest to H / W (a factor pair of
    k)."""
    H, W = hw
    pairs = [(a, k // a) for a in range(1, k + 1) if k % a == 0 and a <= H and k // a <= W]
    if not pairs:
        raise ValueError(f"pool: {k} cells do not fit a {H}x{W} grid as gh x gw")
    return min(pairs, key=lambda p: abs(math.log(p[0] / p[1]) - math.log(H / W)))


def pool(hw, k):
    """Adaptive average pooling's bins: cell (i, j) covers rows floor(i H / gh) .. ceil((i + 1) H /
    gh) - 1 (and so for columns)."""
    (H, W), (gh, gw) = hw, pool_shape(hw, k)
    Wt, reps = torch.zeros(k, H * W, dtype=torch.float64), []
    for i in range(gh):
        r0, r1 = (i * H) // gh, -((-(i + 1) * H) // gh)
        for j in range(gw):
            c0, c1 = (j * W) // gw, -((-(j + 1) * W) // gw)
            cells = [r * W + c for r in range(r0, r1) for c in range(c0, c1)]
            Wt[i * gw + j, cells] = 1.0 / len(cells)
            reps.append(((r0 + r1 - 1) // 2) * W + (c0 + c1 - 1) // 2)
    return Wt, torch.tensor(reps)


def tome(X, k):
    """Rounds of bipartite soft matching over the current (merged) tokens, ordered by
    representative, until k remain; a round merges min(n - k, |A|) edges."""
    T = len(X)
    groups = torch.eye(T, dtype=torch.float64)  # [n, T]: token counts of each current group
    reps = torch.arange(T)
    Xd = X.double()
    while len(reps) > k:
        merged = (groups @ Xd) / groups.sum(1, keepdim=True)
        a, b = torch.arange(0, len(reps), 2), torch.arange(1, len(reps), 2)
        sim = F.normalize(merged[a], dim=1) @ F.normalize(merged[b], dim=1).T
        best, dst = sim.max(1)
        r = min(len(reps) - k, len(a))
        src = best.argsort(descending=True, stable=True)[:r]
        keep_a = torch.ones(len(a), dtype=torch.bool)
        keep_a[src] = False
        groups[b] = groups[b].index_add(0, dst[src], groups[a[src]])
        stay = torch.cat([a[keep_a], b]).sort().values
        groups, reps = groups[stay], reps[stay]
    return groups / groups.sum(1, keepdim=True), reps


def visionzip(X, k, attention):
    """k - c dominant tokens (the most attention received), then c = round(k * 10 / 64) contextual
    tokens (at least one when k > 1): of the remaining tokens, c evenly spaced targets, every other
    remaining token joined to its most similar target; each contextual token is the mean of its
    cluster, at the target's position."""
    T = len(X)
    c = min(k - 1, max(1, round(k * CONTEXTUAL_SHARE))) if k > 1 else 0
    dominant = attention.double().topk(k - c).indices.sort().values
    rest = torch.ones(T, dtype=torch.bool)
    rest[dominant] = False
    rest = rest.nonzero().squeeze(1)
    Wt = torch.zeros(k, T, dtype=torch.float64)
    Wt[torch.arange(k - c), dominant] = 1.0
    reps = dominant.tolist()
    if c:
        targets = rest[torch.linspace(0, len(rest) - 1, c).round().long()]
        others = rest[~torch.isin(rest, targets)]
        sim = F.normalize(X[others].double(), dim=1) @ F.normalize(X[targets].double(), dim=1).T
        join = sim.argmax(1)
        for j, t in enumerate(targets.tolist()):
            members = [t] + others[join == j].tolist()
            Wt[k - c + j, members] = 1.0 / len(members)
        reps += targets.tolist()
    order = torch.tensor(reps).argsort()
    return Wt[order], torch.tensor(reps)[order]


def pooled(X, k, hw):
    return pool(hw, k)


MERGING = {
    "pool": Rule(pooled, needs=("hw",)),
    "tome": Rule(tome),
    "visionzip": Rule(visionzip, needs=("attention",)),
}
MERGES = tuple(MERGING)


def merge(rule, X, k, hw=None, attention=None):
    """(W [k, T], representatives [k], ascending) of rule for one image X [T, D]."""
    if rule not in MERGING:
        raise ValueError(f"unknown merging rule '{rule}' (choose from {', '.join(MERGES)})")
    return MERGING[rule](rule, X, k, dict(hw=hw, attention=attention))
