"""
Token-selection rules: which k of an image's T tokens to keep, and every token rebuilt from the kept
ones (its projection onto their span). tokens.py compares the rules on the features; vqa_eval.py
asks the model with only the kept tokens.

    leverage    the k largest leverage scores of the rank-k SVD, ‖U_k[t]‖² (SVD-Prune, arXiv
                2604.11530)
    lrcp        the k tokens worst explained by the training split's top principal subspace, i.e.
                the largest residual ‖x − P x‖ (LRCP, arXiv 2605.15621)
    pivoted_qr  column-pivoted QR of Xᵀ: greedily the token farthest from the span of those already
                kept (a classical column-subset selection; LAPACK's geqp3 criterion)
    divprune    DivPrune (arXiv 2503.02175): greedy max-min diversity in cosine distance, each time
                the token farthest from all those kept
    dart        DART (arXiv 2502.11494) on the features: a few pivot tokens (largest L1 norm), then
                in turn for each pivot the token least similar to it (duplication-aware)
    norm        the k largest token norms ‖x_t‖
    grid        a uniform spatial grid of k cells over the H×W token grid
    random      k tokens drawn uniformly (seeded)

Question-aware rules (they need each token's relevance to the question, `relevance`):
    cdpruner    CDPruner (arXiv 2506.10967): the greedy MAP of a determinantal point process whose
                kernel couples the tokens' cosine similarity with their relevance, L = diag(q) S
                diag(q), q = exp(θ · relevance) (the quality x diversity form of Chen et al. 2018,
                whose fast greedy MAP it uses)
    mmr         IDPruner's maximal marginal relevance (arXiv 2602.13315): each time the token
                maximising λ · relevance − (1 − λ) · its largest cosine similarity to the tokens
                kept so far
    spare       SPARE (arXiv 2606.18681): column subset selection by projection residual (pivoted
                QR's greedy step) with anti-relevance: each time the token maximising its residual
                norm after projection onto the kept tokens' span times 1 − λ · relevance (the paper
                finds less relevant tokens keep the context; its exact weighting is not public in
                a form we could check: this product is ours, λ = SPARE_LAMBDA)

Merging rules (pooling, ToMe, VisionZip) are in merging.py.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

LRCP_RANK = 32  # lrcp: the rank of the training split's principal subspace, by default
CDP_THETA = 1.0  # CDPruner: how strongly relevance scales a token's quality
MMR_LAMBDA = 0.5  # IDPruner: relevance against redundancy
SPARE_LAMBDA = 0.5  # SPARE: how far relevance lowers a token's residual score
DART_PIVOTS = 4  # DART's pivot image tokens


def pivoted_qr(X, k, weight=None):
    """The first k pivots of the column-pivoted QR of Xᵀ (tokens as columns): at each step the token
    with the largest norm after removing its components along the tokens already kept (modified
    Gram-Schmidt, float64). weight [T] >= 0: the largest weight_t · residual norm_t instead
    (SPARE)."""
    R = X.double().clone()
    norms = (R * R).sum(1)
    w2 = torch.ones(len(R), dtype=R.dtype) if weight is None else weight.double().cpu() ** 2
    tiny = 1e-24 * max(1.0, float(norms.max()))
    kept = []
    for _ in range(min(k, len(R))):
        norms[kept] = -1.0
        t = int((norms * w2.to(norms.device)).argmax())
        if norms[t] <= tiny:
            break  # the rest lies in the span already kept: any further token adds nothing
        kept.append(t)
        q = R[t] / R[t].norm()
        c = R @ q
        R -= torch.outer(c, q)
        # downdate, recomputed now and then
        norms = (R * R).sum(1) if len(kept) % 16 == 0 else norms - c * c
    # rank-deficient X: fill with the largest remaining norms (they add nothing to the span)
    if len(kept) < k:
        rest = [
            t for t in (X.double() ** 2).sum(1).argsort(descending=True).tolist() if t not in kept
        ]
        kept += rest[: k - len(kept)]
    return torch.tensor(kept)


def spare(X, k, relevance, lam=SPARE_LAMBDA):
    """SPARE: column subset selection by projection residual, each token's residual norm scaled by
    its anti-relevance 1 - lam · relevance (less relevant tokens carry the context); lam = 0 is
    pivoted_qr."""
    return pivoted_qr(X, k, 1.0 - lam * relevance.double())


def divprune(X, k):
    """DivPrune's greedy max-min diversity in cosine distance: first the token whose nearest other
    token is farthest, then each time the token farthest from every token kept so far."""
    Xn = torch.nn.functional.normalize(X.double(), dim=1)
    dist = 1.0 - Xn @ Xn.T
    near = dist + torch.diag(torch.full((len(X),), float("inf"), dtype=dist.dtype))
    kept = [int(near.min(0).values.argmax())]
    gap = dist[kept[0]].clone()
    for _ in range(k - 1):
        gap[kept] = -1.0
        t = int(gap.argmax())
        kept.append(t)
        gap = torch.minimum(gap, dist[t])
    return torch.tensor(kept)


def dart(X, k, pivots=DART_PIVOTS):
    """DART's duplication-aware selection on the features: the `pivots` tokens of largest L1 norm,
    then, in turn for each pivot, the token least similar to it (cosine) not kept yet, until k."""
    p = min(pivots, k)
    kept = X.double().abs().sum(1).topk(p).indices.tolist()
    Xn = torch.nn.functional.normalize(X.double(), dim=1)
    order = (Xn[kept] @ Xn.T).argsort(1)  # per pivot, the least similar tokens first
    cursor, taken = [0] * p, set(kept)
    while len(kept) < k:
        for j in range(p):
            while int(order[j, cursor[j]]) in taken:
                cursor[j] += 1
            t = int(order[j, cursor[j]])
            kept.append(t)
            taken.add(t)
            if len(kept) == k:
                break
    return torch.tensor(kept)


def grid_tokens(hw, k):
    """k tokens on a uniform spatial lattice of the H×W grid: gh × gw cell centres (gh/gw ≈ H/W,
    gh·gw >= k), thinned evenly to exactly k, raster order."""
    H, W = hw
    gh = max(1, min(H, round(math.sqrt(k * H / W))))
    gw = min(W, math.ceil(k / gh))
    while gh * gw < k:
        gh, gw = min(H, gh + 1), min(W, math.ceil(k / min(H, gh + 1)))
    pts = [
        int((i + 0.5) * H / gh) * W + int((j + 0.5) * W / gw) for i in range(gh) for j in range(gw)
    ]
    keep = np.round(np.linspace(0, len(pts) - 1, k)).astype(int)
    return torch.tensor(sorted({pts[i] for i in keep}))


def relevance(X, Q):
    """Each token's relevance to a question: the mean cosine between the token x_t [D] and the
    question's token embeddings Q [q, D] (the language model's own input embeddings: Qwen's merger
    maps the tower's output into that space, so no second text encoder is needed), min-max scaled to
    [0, 1] over the image's tokens."""
    Xn = torch.nn.functional.normalize(X.double(), dim=1)
    Qn = torch.nn.functional.normalize(Q.double().to(X.device), dim=1)
    r = (Xn @ Qn.T).mean(1)
    return (r - r.min()) / (r.max() - r.min()).clamp_min(1e-12)


def dpp_greedy_map(L, k):
    """The fast greedy MAP of a DPP with kernel L [T, T] (Chen, Zhang and Zhou, NeurIPS 2018): each
    step adds the item that most increases log det L_S, by an incremental Cholesky factorisation
    (O(T k²)). Once L_S is numerically singular (more items than the kernel's rank) the rest follow
    by their gain, largest first."""
    T = len(L)
    c, d2 = torch.zeros(k, T, dtype=L.dtype), L.diagonal().clone()
    kept = [int(d2.argmax())]
    while len(kept) < k:
        m, j = len(kept) - 1, kept[-1]
        e = (L[j] - c[:m, j] @ c[:m]) / d2[j].clamp_min(1e-300).sqrt()
        c[m], d2 = e, d2 - e * e
        d2[kept] = -float("inf")
        kept.append(int(d2.argmax()))
    return torch.tensor(kept)


def cdpruner(X, k, relevance, theta=CDP_THETA):
    """CDPruner: the DPP's greedy MAP with L = diag(q) S diag(q), S the tokens' cosine similarity (a
    Gram matrix, so L is positive semi-definite), q = exp(theta · relevance)."""
    Xn = torch.nn.functional.normalize(X.double(), dim=1)
    q = torch.exp(theta * relevance.double().to(X.device))
    return dpp_greedy_map(q[:, None] * (Xn @ Xn.T) * q[None, :], k)


def mmr(X, k, relevance, lam=MMR_LAMBDA):
    """IDPruner's maximal marginal relevance: greedily argmax λ · rel_t − (1 − λ) · max over kept s
    of cos(x_t, x_s) (no redundancy term for the first)."""
    Xn = torch.nn.functional.normalize(X.double(), dim=1)
    sim, rel = Xn @ Xn.T, relevance.double().to(X.device)
    redundancy, kept = torch.zeros(len(X), dtype=torch.float64, device=X.device), []
    for _ in range(k):
        score = lam * rel - (1 - lam) * redundancy
        score[kept] = -float("inf")
        kept.append(int(score.argmax()))
        redundancy = sim[kept[-1]] if len(kept) == 1 else torch.maximum(redundancy, sim[kept[-1]])
    return torch.tensor(kept)


def leverage(X, k):
    """U_k from the eigenvectors of the T x T Gram matrix (float64): its k largest row norms."""
    Xd = X.double()
    U = torch.linalg.eigh(Xd @ Xd.T)[1][:, -k:]
    return (U * U).sum(1).topk(k).indices


def lrcp(X, k, basis):
    Xd = X.double()
    resid = Xd - (Xd @ basis) @ basis.T
    return (resid * resid).sum(1).topk(k).indices


def largest_norm(X, k):
    return (X.double() ** 2).sum(1).topk(k).indices


def grid(X, k, hw):
    return grid_tokens(hw, k)


def uniform(X, k, generator=None):
    return torch.randperm(len(X), generator=generator)[:k]


@dataclass(frozen=True)
class Rule:
    """A selection rule: fn(X, k, **inputs) with the inputs it needs (a missing one is refused) and
    those it may take."""

    fn: object
    needs: tuple = ()
    takes: tuple = ()
    acts: str = "after the tower"  # where in the model the reduction happens

    @property
    def question_aware(self):
        return "relevance" in self.needs

    @property
    def needs_attention(self):
        """It reads attention weights: the tower must run eager attention (sdpa and
        FlashAttention return none)."""
        return "attention" in self.needs

    def __call__(self, name, X, k, given):
        """fn on one image X [T, D]; given: {input: value or None}; a needed one missing is refused
        by name."""
        for need in self.needs:
            if given[need] is None:
                raise ValueError(f"{name} needs {NEEDED[need]}")
        return self.fn(X, k, **{n: given[n] for n in self.needs + self.takes})


SELECTION = {
    "leverage": Rule(leverage),
    "lrcp": Rule(lrcp, needs=("basis",)),
    "pivoted_qr": Rule(pivoted_qr),
    "divprune": Rule(divprune),
    "dart": Rule(dart),
    "norm": Rule(largest_norm),
    "grid": Rule(grid, needs=("hw",)),
    "random": Rule(uniform, takes=("generator",)),
    # need the question; vqa_eval.py, lmms_eval_lowrank.py, tokens.py on Qwen caches
    "cdpruner": Rule(cdpruner, needs=("relevance",)),
    "mmr": Rule(mmr, needs=("relevance",)),
    "spare": Rule(spare, needs=("relevance",)),
}
QUESTION_RULES = tuple(n for n, r in SELECTION.items() if "relevance" in r.needs)
RULES = tuple(n for n in SELECTION if n not in QUESTION_RULES)
NEEDED = {
    "basis": "lrcp's principal basis",
    "hw": "the token grid (H, W)",
    "relevance": "each token's relevance to the question",
    "attention": "the vision tower's attention received per token",
}


def select(rule, X, k, *, hw=None, basis=None, generator=None, relevance=None):
    """Indices [k] of the tokens rule keeps for one image X [T, D]; relevance [T] for the
    question-aware rules."""
    if rule not in SELECTION:
        raise ValueError(f"unknown rule '{rule}' (choose from {', '.join(SELECTION)})")
    given = dict(hw=hw, basis=basis, generator=generator, relevance=relevance)
    return SELECTION[rule](rule, X, k, given)


def reconstruct_from(X, kept, rtol=1e-10):
    """Every token projected onto the span of the kept tokens: X̂ = X·pinv(X_S)·X_S, computed stably
    as X·V·Vᵀ with V the right singular vectors of X_S above rtol·σ₁ (float64). kept: indices, or
    the rows [k, D] themselves (merged tokens)."""
    Xd = X.double()
    rows = Xd[kept] if kept.dtype in (torch.int64, torch.int32) else kept.double()
    _, S, Vh = torch.linalg.svd(rows, full_matrices=False)
    V = Vh[S > rtol * S[0]].T if len(S) and S[0] > 0 else Vh[:0].T
    return (Xd @ V) @ V.T


def box_hits(kept, mask):
    """(recall, precision) of a kept set against an answer-box mask: the share of the box's tokens
    kept, and the share of the kept tokens inside the box."""
    hit = int(mask[kept].sum())
    return hit / int(mask.sum()), hit / len(kept)
