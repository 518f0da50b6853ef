"""
Low-rank factorisers X [B, T, D] -> (X̂, A [B, T, r], B [B, r, D]) with X̂ = A·B (T tokens, D dims:
[256, 2048] for Qwen2.5-VL-3B at 448², the cache's shape in general), selected by --arch, the
training loss, and the checkpoint format (plain and compressed). Pure torch; of the project it
imports only the error type, the metrics/SVD module and the row quantiser.

    symmetric  the original toolkit's design (LowRankProjSymmetric): a token-wise residual MLP makes
               each row of A from a D-dim token, the same kind of MLP over the columns of X (T-dim)
               makes each column of B.
    subspace   learned subspace iteration: Q = orth((X Xᵀ)^p X·Ω) with a learned Ω [D, m]
               (initialised from the training data's principal directions), A = Q, B = QᵀX; QR keeps
               column order, so one model serves every rank k <= r. Per rank a schedule picks the
               power steps p and the extra columns (the best rank k inside a wider range, by the
               small eigendecomposition of QᵀX): DEFAULT_SCHEDULE.
"""

import hashlib
import io
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowrank.cli import UserError
from lowrank.config import LEGACY_SHAPE, RunConfig
from lowrank.metrics import principal_directions
from lowrank.quantize import dequantize_rows


class ResBlock(nn.Module):
    """LayerNorm -> Linear -> ReLU -> Linear, plus a linear shortcut (identity when in == out)."""

    def __init__(self, d_in, d_hidden, d_out):
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        self.fc1, self.fc2 = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)
        self.shortcut = nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.shortcut(x) + self.fc2(F.relu(self.fc1(self.norm(x))))


def branch(d_in, d_hidden, d_out, n_blocks):
    return nn.Sequential(
        ResBlock(d_in, d_hidden, d_out),
        *[ResBlock(d_out, d_hidden, d_out) for _ in range(n_blocks - 1)],
    )


class Symmetric(nn.Module):
    """A = f(X) row-wise (each token -> r values); B = g(Xᵀ) row-wise, transposed (each T-dim column
    -> r values)."""

    def __init__(
        self, rank=128, tokens=LEGACY_SHAPE[0], dim=LEGACY_SHAPE[1], hidden=512, n_blocks=2
    ):
        super().__init__()
        self.rank = rank
        self.row = branch(dim, hidden, rank, n_blocks)
        self.col = branch(tokens, hidden, rank, n_blocks)

    def forward(self, X, rank=None):
        A, B = self.factors(X, rank)
        return A @ B, A, B

    def factors(self, X, rank=None):
        """(A [B, T, r], B [B, r, D]); the network serves its trained rank r only (rank: None or
        r)."""
        if rank not in (None, self.rank):
            raise ValueError(f"rank {rank}: this model serves only its trained rank {self.rank}")
        return self.row(X), self.col(X.transpose(1, 2)).transpose(1, 2)


def _chol_orth(Y, gram64):
    """One Cholesky-QR pass: R = chol(YᵀY), Q = Y R⁻¹ (R upper triangular, so Q[..., :j] spans
    Y[..., :j]). The k x k Gram matrix, its Cholesky and R⁻¹ in float64 (gram64: the Gram matrix
    too, for an ill-conditioned Y), the product Y R⁻¹ in Y's dtype (one k x k triangular inverse and
    a GEMM cost less on CPU than a triangular solve with T right-hand sides). -> (Q, R⁻¹, bad): bad
    marks samples whose Gram matrix is not numerically positive definite (Y rank-deficient, or κ(Y)
    beyond ~1e6, where a float32 Y R⁻¹ would not come out orthonormal)."""
    G = Y.double().transpose(-1, -2) @ Y.double() if gram64 else (Y.transpose(-1, -2) @ Y).double()
    with torch.no_grad():
        R, info = torch.linalg.cholesky_ex(G, upper=True)
        d = R.diagonal(dim1=-2, dim2=-1)
        bad = (
            (info > 0) | ~torch.isfinite(d).all(-1) | (d.min(-1).values <= 1e-6 * d.max(-1).values)
        )
    # keep the failing samples out of the (differentiable) factorisation: identity in their place
    if bad.any():
        G = torch.where(
            bad[:, None, None], torch.eye(G.shape[-1], dtype=G.dtype, device=G.device), G
        )
    R = torch.linalg.cholesky(G, upper=True) if torch.is_grad_enabled() or bad.any() else R
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device).expand_as(R)
    R_inv = torch.linalg.solve_triangular(R, eye, upper=True).to(Y.dtype)
    with torch.autocast(Y.device.type, enabled=False):  # under --amp too: the basis in float32
        return Y @ R_inv, R_inv, bad


def _householder(Q, Y, bad):
    """Q with the samples marked bad replaced by Householder QR of Y (same column order, always
    orthonormal, slower on these tall-skinny batches), passing no gradient: QR's gradient is NaN on
    rank-deficient input, and a degenerate sample must not put NaN into Ω during training."""
    Q = Q.clone()
    Q[bad] = torch.linalg.qr(Y[bad].detach(), mode="reduced")[0]
    return Q


def _orth(Y, passes=2):
    """Orthonormal basis Q of Y's columns [B, T, k] in column order (Q[..., :j] spans Y[..., :j] for
    every j), in float32 at least (bf16 under --amp is promoted). Cholesky-QR twice (CholQR2;
    Yamamoto et al. 2015): the first pass (float64 Gram) takes Y to a nearly orthonormal Q, the
    second (float32 Gram, κ ≈ 1 now) restores orthogonality to float32 rounding; one pass is enough
    where only the span matters (inside a power step). Samples one pass marks as rank-deficient or
    too ill-conditioned are redone by Householder QR."""
    Y = Y if Y.dtype in (torch.float32, torch.float64) else Y.float()
    Q, _, bad = _chol_orth(Y, gram64=True)
    for _ in range(passes - 1):
        Q, _, bad2 = _chol_orth(Q, gram64=False)
        bad = bad | bad2
    return _householder(Q, Y, bad) if bad.any() else Q


def _project(Y, X):
    """(Q, C = Qᵀ X): Q an orthonormal basis of Y's columns in column order, X̂ = Q C the projection
    of X onto range(Y), each prefix of Q's columns onto the span of Y's prefix. One Cholesky pass
    (float64 Gram) and C = R⁻ᵀ (Yᵀ X): Q C = Y (YᵀY)⁻¹ Yᵀ X is the projection even where Q = Y R⁻¹
    comes out orthonormal only to ~κ(Y)·1e-7, so the second pass CholQR2 would spend is not needed.
    Bad samples as in _orth."""
    Y = Y if Y.dtype in (torch.float32, torch.float64) else Y.float()
    X = X.to(Y.dtype)
    Q, R_inv, bad = _chol_orth(Y, gram64=True)
    with torch.autocast(Y.device.type, enabled=False):
        C = R_inv.transpose(-1, -2) @ (Y.transpose(-1, -2) @ X)
    if bad.any():
        Q = _householder(Q, Y, bad)
        C = torch.where(bad[:, None, None], Q.transpose(-1, -2) @ X, C)
    return Q, C


# (max rank, oversample, power steps): rank k takes the first row with k <= max rank (the last row
# above them all). Chosen by bench.py --ablation on real ViT tokens (docs/results.md): at small
# ranks 8 extra columns and one power step close the gap best per unit of cost; at large ranks the
# eigendecomposition an oversampled basis needs costs more than a second power step, which is also
# closer to SVD.
DEFAULT_SCHEDULE = [[64, 8, 1], [256, 0, 2]]


class Subspace(nn.Module):
    """Learned subspace iteration. Ω [D, m] is a parameter; for rank k, with (o, p) = the schedule's
    setting for k and m = k + o, per sample Q = orth(X Ω[:, :m]) (column order kept, so the first j
    columns of Q span X Ω[:, :j]), then p power steps Q = orth(X (Xᵀ Q)) (or, where it is cheaper,
    one Gram matrix X Xᵀ and p steps Q = orth((X Xᵀ) Q)).
    o = 0: A = Q, B = Qᵀ X, so X̂ = Q Qᵀ X is the projection of X onto range((X Xᵀ)^p X Ω[:, :k]),
    and the first j components give the projection onto range((X Xᵀ)^p X Ω[:, :j]): nested ranks by
    construction. o > 0: C = Qᵀ X, C = V Σ Wᵀ via the m x m Gram matrix, A = Q V_k Σ_k, B = W_kᵀ:
    the best rank-k approximation inside range(Q), ordered by singular value.
    Either way X̂ is exact when range(Q) holds X's top-k left singular vectors. Ω starts at the
    training tokens' top principal directions and is trained to maximise the energy of X captured by
    each prefix of Q at the trained rank (objective), differentiable through the orthonormalisation
    and the power steps. oversample / power_iters, where given, replace the schedule by one setting
    for every rank (checkpoints from before the schedule)."""

    def __init__(
        self,
        rank=128,
        *,
        tokens=LEGACY_SHAPE[0],
        dim=LEGACY_SHAPE[1],
        oversample=None,
        power_iters=None,
        schedule=None,
        out_map=0,
    ):
        super().__init__()
        self.rank = rank
        # X̂ = A·(B diag(g)): a learned gain per feature, for a downstream objective (--out_map)
        self.out_map = nn.Parameter(torch.ones(dim)) if out_map else None
        if oversample is not None or power_iters is not None:
            schedule = [[tokens, oversample or 0, 1 if power_iters is None else power_iters]]
        self.schedule = [list(row) for row in (schedule or DEFAULT_SCHEDULE)]
        m = min(tokens, max(k + self.setting(k)[0] for k in range(1, rank + 1)))
        self.omega = nn.Parameter(torch.randn(dim, m) / math.sqrt(dim))

    def setting(self, k):
        """(oversample, power steps) at rank k."""
        row = next((row for row in self.schedule if k <= row[0]), self.schedule[-1])
        return row[1], row[2]

    @property
    def power_iters(self):
        return self.setting(self.rank)[1]

    @torch.no_grad()
    def init_from_data(self, batches):
        """Ω = top principal directions of the training tokens (eigenvectors of Σ XᵀX), in
        float64."""
        V = principal_directions(batches, self.omega.device)
        self.omega.copy_(V[:, : self.omega.shape[1]].to(self.omega.dtype))

    def basis(self, X, k, power_iters, orthonormal=False):
        """(Q [B, T, k], Qᵀ X): Q an orthonormal basis of (X Xᵀ)^p X Ω[:, :k]. QR keeps column order
        and each power step maps prefixes to prefixes, so Q for j < k columns is the first j columns
        of Q for k: a small rank never pays for the full basis. Only the last step is
        orthonormalised fully (_project); the start X Ω only has its columns scaled (Ω's columns are
        nearly X's principal directions, so X Ω's are nearly orthogonal), and the power steps go
        through the T x T Gram matrix where that costs fewer products. orthonormal: Q orthonormal to
        float32 rounding (CholQR2), as a Rayleigh-Ritz step on it needs."""
        T, D = X.shape[1:]
        omega = self.omega[:, :k].to(X.dtype)
        # scale-free: no overflow
        Y = X @ (omega / omega.abs().amax(0).clamp_min(torch.finfo(omega.dtype).tiny))
        G = (
            X @ X.transpose(1, 2)
            if T * T * (D + power_iters * k) < 2 * power_iters * T * D * k
            else None
        )
        for i in range(power_iters):
            Q = (
                Y / Y.norm(dim=1, keepdim=True).clamp_min(torch.finfo(Y.dtype).tiny)
                if i == 0
                else _orth(Y, 1)
            )
            Y = G @ Q if G is not None else X @ (X.transpose(1, 2) @ Q)
        if orthonormal:
            Q = _orth(Y, 2)
            return Q, Q.transpose(1, 2) @ X
        return _project(Y, X)

    def forward(self, X, rank=None):
        A, B = self.factors(X, rank)
        return A @ B, A, B

    def factors(self, X, rank=None):
        """(A, B) for rank k (default: the trained rank r), each rank with its schedule's setting;
        with an output map g, B diag(g) in place of B."""
        A, B = self.subspace_factors(X, rank)
        return (A, B) if self.out_map is None else (A, B * self.out_map.to(B.dtype))

    def subspace_factors(self, X, rank=None):
        r = self.rank if rank is None else rank
        if not 1 <= r <= self.rank:
            raise ValueError(f"rank {r}: this model serves ranks 1..{self.rank} (its trained rank)")
        o, p = self.setting(r)
        m = min(r + o, self.omega.shape[1])
        Q, C = self.basis(X, m, p, orthonormal=m > r)  # [B, T, m], [B, m, D]
        if m == r:  # nested by column order
            return Q, C
        w, V = torch.linalg.eigh((C @ C.transpose(1, 2)).double())
        V, s = V.flip(-1)[..., :r], w.flip(-1)[..., :r].clamp_min(0).sqrt()
        V, s = V.to(X.dtype), s.to(X.dtype)
        A = (Q @ V) * s[:, None, :]
        inv = torch.where(s > s[:, :1] * 1e-6, 1 / s, torch.zeros_like(s))
        B = (V.transpose(1, 2) @ C) * inv[:, :, None]
        return A, B

    @staticmethod
    def objective(X, A, B):
        """What subspace training minimises: the mean over nested ranks k = 16, 32, ..., r of the
        share of X's energy outside the first k components, 1 - Σ_{i<=k} ‖a_i‖²‖b_i‖² / ‖X‖² (exact
        here because A's columns and B's rows are mutually orthogonal: Q is orthonormal, or B =
        W_rᵀ). Differentiable through QR."""
        cum = (A.pow(2).sum(1) * B.pow(2).sum(2)).cumsum(1)  # [batch, r]
        r = A.shape[-1]
        # 16, 32, 64, ... below r, and r
        ks = sorted({2**j for j in range(4, 16) if 2**j < r} | {r})
        # an all-zero X leaves energy 0 of 0
        total = X.pow(2).sum((1, 2)).clamp_min(torch.finfo(X.dtype).tiny)
        return torch.stack([1 - (cum[:, k - 1] / total).mean() for k in ks]).mean()


ARCHS = {"symmetric": Symmetric, "subspace": Subspace}
ARCH_DEFAULTS = {
    "symmetric": dict(hidden=512, n_blocks=2),
    "subspace": dict(schedule=DEFAULT_SCHEDULE),
}


def build_model(config):
    """config: a RunConfig (or its stored dict): arch, rank, arch options (missing ones take
    ARCH_DEFAULTS), the feature shape. Every number is checked first (a positive int; rank at most
    min(tokens, dim)), so an odd config never allocates anything."""
    if isinstance(config, dict):
        config = RunConfig.from_dict(config)
    arch = config.arch
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch '{arch}' (choose from {', '.join(ARCHS)})")
    kw = dict(ARCH_DEFAULTS[arch], **config.arch_options)
    sizes = {"rank": config.rank, "tokens": config.tokens, "dim": config.dim, **kw}
    schedule = sizes.pop("schedule", None)
    bad = {
        k: v
        for k, v in sizes.items()
        if type(v) is not int or v < (0 if k in ("oversample", "power_iters", "out_map") else 1)
    }
    if schedule is not None and not (
        isinstance(schedule, list)
        and schedule
        and all(
            isinstance(row, list) and len(row) == 3 and all(type(v) is int and v >= 0 for v in row)
            for row in schedule
        )
    ):
        bad["schedule"] = schedule
    if bad or config.rank > min(config.shape):
        raise ValueError(
            f"config sizes {bad or sizes} are not positive integers with rank <= min(tokens, dim)"
        )
    return ARCHS[arch](**sizes, **({"schedule": schedule} if schedule is not None else {}))


def loss_terms(X, Xhat, A, B, lambda_B, lambda_ortho):
    """The training loss, each term returned separately (scalars, batch means):
    recon = mean((X̂ - X)²)                       reconstruction MSE over all B·T·D entries
    b_reg = mean(B²)                              B-matrix regularisation: mean square entry of B
                                                  [B, r, D]
    ortho = ‖B Bᵀ - I_r‖²_F / r²                  orthogonality of B's rows (0 for truncated SVD's B
                                                  = V_rᵀ, so the term never pulls away from the
                                                  optimum)
    total = recon + lambda_B · b_reg + lambda_ortho · ortho"""
    r = B.shape[1]
    recon = F.mse_loss(Xhat, X)
    b_reg = B.pow(2).mean()
    eye = torch.eye(r, device=B.device, dtype=B.dtype)
    ortho = (B @ B.transpose(1, 2) - eye).pow(2).sum((1, 2)).mean() / r**2
    total = recon + lambda_B * b_reg + lambda_ortho * ortho
    return {"total": total, "recon": recon, "b_reg": b_reg, "ortho": ortho}


# --------------------------------------------------------------------------------------------------
# checkpoint format: a plain dict, loaded with weights_only=True


def make_checkpoint(
    model, config, epoch, best_val_mse, *, optimizer=None, scheduler=None, extra=None
):
    ck = {
        "format": "low-rank-image/1",
        "config": config,
        "model": model.state_dict(),
        "epoch": epoch,
        "best_val_mse": best_val_mse,
    }
    if optimizer is not None:
        ck["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        ck["scheduler"] = scheduler.state_dict()
    ck.update(extra or {})
    return ck


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file as read back: the run's config as saved (RunConfig.from_dict reads it), the
    model's state dict, the epoch it was saved at and the best validation MSE then, the hash of the
    file's bytes (read once), and the rest it holds: a training state's optimizer, scheduler,
    bad_epochs, rng_cpu; a compressed model's omega_int8."""

    config: dict
    model: dict
    epoch: int | None
    best_val_mse: float | None
    sha: str
    extra: dict


def read_checkpoint(path, device="cpu"):
    """-> Checkpoint, the file read as plain data (weights_only): a .pt from elsewhere is data,
    never unpickled code. The file is read once; sha is the hash of those bytes. Every way a file
    can fail to be a checkpoint ends in one UserError line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"checkpoint {path} not found: train first (./train.sh ... or python train_real_data.py)"
        )
    data = path.read_bytes()
    try:
        ck = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # not a pickle of objects: a damaged or foreign file
            raise UserError(
                f"{path} is not a readable checkpoint (UnpicklingError: "
                f"{str(e).splitlines()[0][:200]}); was it written completely?"
            ) from None
        # weights_only refused a pickled object: never load it as code
        found = re.search(r"GLOBAL (\S+)", str(e))
        raise UserError(
            f"{path} is refused: it is not plain data (it holds a pickled Python object"
            f"{f', {found.group(1)}' if found else ''}); a low-rank-image checkpoint holds only tensors "
            f"and plain types"
        ) from None
    except Exception as e:
        raise UserError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}); was it written completely?"
        ) from None
    if not isinstance(ck, dict) or "config" not in ck or "model" not in ck:
        raise UserError(f"{path} is not a low-rank-image checkpoint (no config/model entries)")
    named = ("format", "config", "model", "epoch", "best_val_mse")
    return Checkpoint(
        ck["config"],
        ck["model"],
        ck.get("epoch"),
        ck.get("best_val_mse"),
        hashlib.sha256(data).hexdigest()[:16],
        {k: v for k, v in ck.items() if k not in named},
    )


def load_checkpoint(path, device="cpu"):
    """-> (model in eval mode on device, Checkpoint)."""
    ck = read_checkpoint(path, device)
    try:
        # the config's shapes against the weights', before any memory is spent
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_model(ck.config).state_dict().items()}
        if not ck.config.get("compressed"):
            got = {k: tuple(v.shape) for k, v in ck.model.items() if isinstance(v, torch.Tensor)}
            if got != expected:
                k = next(
                    k for k in sorted(set(got) | set(expected)) if got.get(k) != expected.get(k)
                )
                raise ValueError(
                    f"weight {k}: the config makes {expected.get(k)}, the file holds {got.get(k)}"
                )
        if ck.config.get("compressed"):  # compress.py's int8 / pruned checkpoints
            model = load_compressed(ck)
        else:
            model = build_model(ck.config)
            model.load_state_dict(ck.model)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(
            f"{path}: the checkpoint's config and weights do not build a model "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    return model.to(device).eval(), ck


def quantized_state(qmodel):
    """A dynamically quantised model's Linear layers as plain tensors: int8 weight, its scale and
    zero point, bias."""
    sd = {}
    for name, mod in qmodel.named_modules():
        if isinstance(mod, torch.ao.nn.quantized.dynamic.Linear):
            w, b = mod._packed_params._weight_bias()
            sd[f"{name}.weight_int8"] = w.int_repr()
            sd[f"{name}.weight_scale"] = torch.tensor(w.q_scale())
            sd[f"{name}.weight_zero_point"] = torch.tensor(w.q_zero_point())
            sd[f"{name}.bias"] = b
        # (the quantised Linear's own packing)
        elif not list(mod.children()) and "_packed_params" not in name:
            for k, v in mod.state_dict().items():
                sd[f"{name}.{k}"] = v
    return sd


def load_compressed(ck):
    """Rebuild the float model a compressed checkpoint describes (compress.py model): int8 Ω or int8
    Linear weights are dequantised into the float model, which computes in float32 from the int8
    values."""
    model = build_model(ck.config)
    sd = dict(ck.model)
    if "omega_int8" in ck.extra:
        sd["omega"] = dequantize_rows(ck.extra["omega_int8"]).T
    for k in [k for k in sd if k.endswith(".weight_int8")]:
        stem = k[: -len(".weight_int8")]
        scale, zero = (
            sd.pop(f"{stem}.weight_scale").float(),
            sd.pop(f"{stem}.weight_zero_point").float(),
        )
        sd[f"{stem}.weight"] = (sd.pop(k).float() - zero) * scale
    model.load_state_dict(sd)
    return model
