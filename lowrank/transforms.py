"""
Every downstream condition as one transform of the vision tower's output, named by a short spec
string that reads the same on every command line and in every output file:

    original                 the tower's tokens
    zeros                    every token set to zero (a blind control)
    svd:<r>                  truncated SVD at rank r
    nn:<r>                   the run's trained factoriser at rank r
    keep:<rule>:<k>          only k tokens, chosen by a token_selection rule; they keep their own
                             M-RoPE positions
    merge:<rule>:<k>         k merged tokens (token_merging: pool, tome, visionzip), each the mean
                             of a group, at its representative token's M-RoPE position
    fastv:<K>:<k>            all tokens into the language model, and after its layer K only the k
                             image tokens the last prompt token attends to most (FastV;
                             vlm.fastv_hooks): the tower's tokens unchanged
    codec:<name>[:<r>]       the features through a feature codec (feature_codecs.py) and back
    resize:<side>|<W>x<H>    the image itself at another resolution, through the same tower and
                             model: fewer tokens from the start (VTC-Bench's downsampling
                             baseline); its own tower run, grid and M-RoPE positions
    pixelprune[:<tol>]       before the tower (PixelPrune): the cells whose pixels repeat a kept
                             cell (within tol, 0-255) are removed whole; the tower runs on the
                             others (encoders.pruned_tower), which keep their M-RoPE positions

Reconstructions (svd, nn, codec) are made in the space the factoriser was trained in (the run's
normalisation) and mapped back with each token's own mean and standard deviation; rules choose and
group tokens on the normalised features, and merged tokens are means of the model-scale ones.
apply() returns an Applied record (tokens for the language model, indices of the kept or
representative tokens or None, Qwen3-VL's deepstack features to go with the tokens): keep and
merge shorten the sequence, the others replace the tokens.

Qwen3-VL's deepstack features (one [T, D] matrix per level, added to the image tokens' hidden
states in the language model's first layers) follow every transform: kept tokens keep their rows,
merged tokens take the same merge weights, zeros zeroes them, svd and nn reconstruct each level on
the main tokens' own token-side factor A [T, r] (B_l = the least-squares fit of the level on A, so
the image is still one A [T, r] plus an r x D matrix per level), a per-image codec codes each level
alone; a codec with a data-set basis (pca, omega) is fit to the merger's output and is refused.
"""

from dataclasses import dataclass, field

import torch

from lowrank.cli import UserError, check_rank
from lowrank.feature_cache import denormalize, normalize
from lowrank.feature_codecs import (
    BITS,
    CODECS,
    FLOATS,
    SHARED_BASIS,
    decode,
    encode,
    family,
    payload_bytes,
)
from lowrank.merging import MERGES, merge, pool_shape
from lowrank.metrics import truncated_svd
from lowrank.selection import QUESTION_RULES, RULES, select

KEEP_RULES = RULES + QUESTION_RULES


@dataclass(frozen=True)
class Spec:
    kind: str
    rank: int | None = None  # svd, nn, a rank codec: the rank r
    k: int | None = None  # keep, merge, fastv: the image tokens kept
    rule: str | None = None
    codec: str | None = None
    layer: int | None = None  # fastv: the language model's layers that see every token
    size: tuple | None = None  # resize: the image's (W, H) in pixels
    tolerance: int | None = None  # pixelprune: the largest pixel difference of a repeat (0-255)

    def __str__(self):
        if self.kind == "resize":
            w, h = self.size
            return f"resize:{w}" if w == h else f"resize:{w}x{h}"
        if self.kind == "pixelprune":
            return "pixelprune" if self.tolerance == 0 else f"pixelprune:{self.tolerance}"
        if self.kind in ("keep", "merge"):
            return f"{self.kind}:{self.rule}:{self.k}"
        if self.kind == "fastv":
            return f"fastv:{self.layer}:{self.k}"
        if self.kind == "codec":
            return f"codec:{self.codec}" + (f":{self.rank}" if self.rank is not None else "")
        return self.kind if self.rank is None else f"{self.kind}:{self.rank}"


def token_count(text, tokens=None):
    """A k: a count ('64'), or, given the image's token count, a share of it ('0.25', '1.0': a
    number with a point, above 0 and at most 1), rounded to the nearest count."""
    if tokens is not None and "." in text:
        share = float(text)
        if not 0 < share <= 1:
            raise ValueError(text)
        return max(1, round(share * tokens))
    return int(text)


def parse_spec(text, tokens=None):
    """'svd:64' -> Spec('svd', 64); one UserError naming the spec for anything else than the forms
    above. Given the image's token count, a k may be a share of it: 'keep:norm:0.25' keeps a quarter
    of the tokens."""
    parts = str(text).strip().split(":")
    kind, args = parts[0], parts[1:]
    try:
        if kind in ("original", "zeros") and not args:
            return Spec(kind)
        if kind in ("svd", "nn") and len(args) == 1:
            return Spec(kind, int(args[0]))
        if (
            kind in ("keep", "merge")
            and len(args) == 2
            and args[0] in (KEEP_RULES if kind == "keep" else MERGES)
        ):
            return Spec(kind, k=token_count(args[1], tokens), rule=args[0])
        if kind == "resize" and len(args) == 1:
            w, _, h = args[0].lower().partition("x")
            size = (int(w), int(h or w))
            if min(size) > 0:
                return Spec(kind, size=size)
        if kind == "pixelprune" and len(args) <= 1:
            tol = int(args[0]) if args else 0
            if 0 <= tol <= 255:
                return Spec(kind, tolerance=tol)
        if kind == "fastv" and len(args) == 2:
            return Spec(kind, k=token_count(args[1], tokens), layer=int(args[0]))
        if kind == "codec" and 1 <= len(args) <= 2 and args[0] in CODECS:
            if len(args) == 2 and (args[0] in FLOATS or args[0] in BITS):
                raise UserError(
                    f"transform {text!r}: the {args[0]} codec stores every number and takes no rank"
                )
            return Spec(kind, int(args[1]) if len(args) == 2 else None, codec=args[0])
    except ValueError:
        pass
    raise UserError(
        f"transform {text!r}: expected original, zeros, svd:<r>, nn:<r>, keep:<rule>:<k> (rules: "
        f"{', '.join(KEEP_RULES)}), merge:<rule>:<k> ({', '.join(MERGES)}), fastv:<K>:<k>, resize:<side or WxH>, "
        f"pixelprune[:<tolerance 0-255>] or codec:<name>[:<r>] (codecs: {', '.join(CODECS)})"
    )


def check_spec(spec, tokens, dim, *, nn_rank=None, nested=True, bases=(), hw=None, attention=True):
    """A spec's rank or k within what the features and the run's model allow, before any work.
    attention: whether the vision tower's attention is at hand (visionzip needs it)."""
    if spec.kind in ("keep", "merge", "fastv"):
        check_rank(spec.k, tokens, f"transform {spec}:")
    if spec.kind == "svd" or (spec.kind == "codec" and spec.rank is not None):
        check_rank(spec.rank, min(tokens, dim), f"transform {spec}:")
    if spec.kind == "fastv" and spec.layer < 1:
        raise UserError(f"transform {spec}: K must be at least 1 (the layers that see every token)")
    if spec.kind == "merge" and spec.rule == "pool" and hw is not None:
        try:
            pool_shape(hw, spec.k)
        except ValueError as e:
            raise UserError(f"transform {spec}: {e}") from None
    if spec.kind == "merge" and spec.rule == "visionzip" and not attention:
        raise UserError(
            f"transform {spec}: visionzip needs the vision tower's attention, and these features have no tower"
        )
    if spec.kind == "nn":
        if nn_rank is None:
            raise UserError(f"transform {spec}: the run has no trained factoriser (best_model.pt)")
        if not (1 <= spec.rank <= nn_rank if nested else spec.rank == nn_rank):
            serves = f"ranks 1..{nn_rank}" if nested else f"only its trained rank {nn_rank}"
            raise UserError(f"transform {spec}: the run's factoriser serves {serves}")
    if spec.kind == "codec" and spec.codec not in FLOATS and spec.codec not in BITS:  # a rank codec
        if spec.rank is None:
            raise UserError(
                f"transform {spec}: the {spec.codec} codec needs a rank, e.g. codec:{spec.codec}:64"
            )
        if family(spec.codec) in SHARED_BASIS and family(spec.codec) not in bases:
            raise UserError(
                f"transform {spec}: no {family(spec.codec)} basis in this run (omega needs a subspace run)"
            )


def resize_tokens(spec, size, hw):
    """The vision tokens of the image at resize's size, on the cells the tower makes at size (W, H)
    -> hw (rows, columns); a side that is not a whole number of cells is refused."""
    cell = size[0] // hw[1]
    w, h = spec.size
    if w % cell or h % cell:
        raise UserError(
            f"transform {spec}: each side must be a multiple of the model's {cell}-px cell"
        )
    return (h // cell) * (w // cell)


def stored_bytes(spec, T, D, norm, element_bytes, *, bases=None, levels=1):
    """Bytes per image that reproduce a condition's tokens: numbers in the model's dtype
    (element_bytes each) for original (T x D), svd and nn (the factors, r x (T + D)), keep and merge
    (k x D, plus k int16 positions); a codec's exact payload (feature_codecs.payload_bytes, as
    compress.py counts it; a shared basis is stored once per data set, not counted). Reconstructions
    under layernorm also keep each token's mean and standard deviation (2 x T). levels: the feature
    matrices per image (1 + Qwen3-VL's deepstack levels; svd and nn share A [T, r] across them)."""
    if spec.kind in ("original", "zeros", "fastv", "resize"):  # resize: T of the resized image
        return levels * T * D * element_bytes if spec.kind != "zeros" else 0
    if spec.kind == "pixelprune":  # T: the kept cells (their mean over the images), with positions
        return levels * T * D * element_bytes + 2 * T
    if spec.kind in ("keep", "merge"):
        return levels * spec.k * D * element_bytes + 2 * spec.k
    stats = levels * 2 * T * element_bytes if norm == "layernorm" else 0
    if spec.kind in ("svd", "nn"):
        return spec.rank * (T + levels * D) * element_bytes + stats
    basis = (bases or {}).get(family(spec.codec))
    payload = encode(
        spec.codec, torch.randn(T, D), spec.rank, basis.float().cpu() if basis is not None else None
    )
    return levels * payload_bytes(payload) + stats  # the payload's size depends on the shapes only


@dataclass
class Applied:
    """What a transform gives the language model: tokens [T', D] in the model's scale, the kept or
    representative token indices (None when every token is replaced), and the deepstack features
    [levels, T', D] that go with the tokens (None for the families without them)."""

    tokens: torch.Tensor
    kept: torch.Tensor | None = None
    deepstack: torch.Tensor | None = None


@dataclass(frozen=True)
class TokenSetup:
    """What every image's Tower shares: the features' normalisation and merged grid (rows,
    columns), the run's factoriser, the bases of the rules and codecs that need one ({'lrcp' | 'pca'
    | 'omega': [D, r]}), and the largest SVD rank asked (one SVD an image, sliced for the smaller
    ranks)."""

    norm: str
    hw: tuple
    nn_model: object = None
    bases: dict = field(default_factory=dict)
    max_svd: int = 0


class Tower:
    """One image's tower output and what the transforms share: the normalised tokens, one truncated
    SVD at the largest rank asked (sliced for smaller ones), the factoriser, the bases of the rules
    and codecs."""

    def __init__(self, X, setup, *, attention=None, deepstack=None):
        """X [T, D]: the tokens; setup: a TokenSetup; attention [T]: what each token receives in the
        tower (encoders.attention_received), for visionzip; deepstack [levels, T, D]: Qwen3-VL's
        deepstack features of the same tokens."""
        self.X, self.norm, self.hw = X, setup.norm, setup.hw
        self.nn_model, self.bases = setup.nn_model, setup.bases or {}
        self.attention, self.deepstack = attention, deepstack
        # [T]: each token's relevance to the question (selection.relevance), when asked
        self.relevance = None
        self.Xn = normalize(X, self.norm)
        max_svd = setup.max_svd
        self.svd = [f[0] for f in truncated_svd(self.Xn[None], max_svd)[:2]] if max_svd else None

    def apply(self, spec, generator=None):
        """-> Applied: the tokens in the model's scale, the kept indices, the deepstack features."""
        ds = self.deepstack
        if spec.kind in ("original", "fastv"):  # fastv acts inside the language model
            return Applied(self.X, None, ds)
        if spec.kind in ("resize", "pixelprune"):
            raise ValueError(
                f"{spec.kind} acts on the image: downstream.Asker runs the tower on it again"
            )
        if spec.kind == "zeros":
            return Applied(
                torch.zeros_like(self.X), None, None if ds is None else torch.zeros_like(ds)
            )
        if spec.kind in ("keep", "merge"):
            tokens, kept, W = self.reduce(spec, generator)
            if ds is not None:  # the kept rows, or the same merge weights
                ds = (
                    ds[:, kept.to(ds.device)]
                    if W is None
                    else (W.to(ds.device) @ ds.double()).to(ds.dtype)
                )
            return Applied(tokens, kept, ds)
        if spec.kind == "svd":
            if self.svd is None or self.svd[0].shape[1] < spec.rank:
                self.svd = [f[0] for f in truncated_svd(self.Xn[None], spec.rank)[:2]]
            A = self.svd[0][:, : spec.rank]
            Xh = A @ self.svd[1][: spec.rank]
        elif spec.kind == "nn":
            Xh, A, _ = (f[0] for f in self.nn_model(self.Xn[None], rank=spec.rank))
        else:  # codecs run on the CPU, as compress.py measures them
            if ds is not None and family(spec.codec) in SHARED_BASIS:
                raise UserError(
                    f"transform {spec}: its basis is fit to the merger's output; the deepstack "
                    f"features have none (use a per-image codec)"
                )
            Xh = self.coded(spec, self.Xn)
            levels = (
                [self.coded(spec, normalize(Y, self.norm)) for Y in ds] if ds is not None else None
            )
            return Applied(self.back(Xh, self.X), None, self.back_levels(levels))
        levels = None
        if ds is not None:  # each level's least-squares fit on the tokens' own A
            A64 = A.detach().double()
            levels = [
                A64 @ torch.linalg.lstsq(A64, normalize(Y, self.norm).double()).solution for Y in ds
            ]
        return Applied(self.back(Xh, self.X), None, self.back_levels(levels))

    def coded(self, spec, Xn):
        """Normalised features through a codec and back, on the CPU."""
        basis = self.bases.get(family(spec.codec))
        basis = basis.float().cpu() if basis is not None else None
        payload = encode(spec.codec, Xn.float().cpu(), spec.rank, basis)
        return decode(spec.codec, payload, basis).to(Xn.device)

    def back(self, Xh, X):
        """Reconstructed normalised features in X's scale (each token's own mean and deviation)."""
        return denormalize(Xh.to(X.dtype), X, self.norm)

    def back_levels(self, levels):
        if levels is None:
            return None
        return torch.stack([self.back(Yh, Y) for Yh, Y in zip(levels, self.deepstack)])

    def reduce(self, spec, generator=None):
        """keep and merge -> (k tokens in the model's scale, kept or representative indices, merge
        weights W [k, T] or None)."""
        if spec.kind == "keep":
            kept = (
                select(
                    spec.rule,
                    self.Xn,
                    spec.k,
                    hw=self.hw,
                    basis=self.bases.get("lrcp"),
                    generator=generator,
                    relevance=self.relevance,
                )
                .sort()
                .values
            )
            return self.X[kept.to(self.X.device)], kept, None
        W, reps = merge(spec.rule, self.Xn, spec.k, self.hw, self.attention)
        return (W.to(self.X.device) @ self.X.double()).to(self.X.dtype), reps, W

    def dense(self, spec, generator=None):
        """For a read-out that needs every token's place (a dense head) -> (tokens [T', D], owner
        [T]): token t takes the output of tokens[owner[t]]. Its own for the conditions that replace
        every token; its group's for a merge (the merge's own assignment); for a selection, the kept
        token nearest on the grid, by position alone: what the kept set knows without the dropped
        tokens' features (ties: the lower index)."""
        T = self.X.shape[0]
        if spec.kind not in ("keep", "merge"):
            return self.apply(spec, generator).tokens, torch.arange(T)
        tokens, kept, W = self.reduce(spec, generator)
        if W is not None:
            return tokens, W.argmax(0).cpu()
        rows, cols = torch.arange(T) // self.hw[1], torch.arange(T) % self.hw[1]
        kept = kept.cpu()
        dist = (rows[:, None] - rows[kept][None]) ** 2 + (cols[:, None] - cols[kept][None]) ** 2
        return tokens, dist.argmin(1)
