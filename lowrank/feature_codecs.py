"""
Feature codecs: encode(codec, X [T, D] float32, rank, basis) -> payload (a dict of tensors),
decode(codec, payload, basis) -> X̂. A compressed cache (compress.py cache) stores payloads;
FeatureDataset decodes them on load.

    fp32, fp16, bf16          the features as floats
    int8, int4                per-token absmax quantisation (one float32 scale per token)
    svd_fp16, svd_int8        per-image truncated SVD factors A = U_rΣ_r [T, r], B = V_rᵀ [r, D]
                              (int8: absmax per row)
    pca_fp16/int8/int4        coefficients X·P [T, r] on the training split's top-r principal
                              directions P [D, r]
    omega_fp16/int8/int4      the same on the trained subspace model's Ω, orthonormalised (a
                              subspace run only)
"""

import torch

from lowrank.metrics import truncated_svd
from lowrank.quantize import dequantize_rows, quantize_rows

FLOATS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BITS = {"int8": 8, "int4": 4}
CODECS = (
    *FLOATS,
    *BITS,
    "svd_fp16",
    "svd_int8",
    *(f"{fam}_{kind}" for fam in ("pca", "omega") for kind in ("fp16", "int8", "int4")),
)
SHARED_BASIS = ("pca", "omega")  # families whose basis is stored once per data set
BASIS = "basis.pt"  # a compressed cache's shared basis, beside its manifest


def payload_bytes(p):
    """Bytes of a payload's numbers (codes and scales; the shape record is bookkeeping, not
    counted)."""
    return sum(v.numel() * v.element_size() for k, v in flat_items(p) if not k.endswith("shape"))


def flat_items(p, prefix=""):
    for k, v in p.items():
        if isinstance(v, dict):
            yield from flat_items(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def family(codec):
    return codec.split("_")[0] if "_" in codec else codec


def encode(codec, X, rank=None, basis=None):
    fam, kind = family(codec), codec.split("_")[-1]
    if codec in FLOATS:
        return {"x": X.to(FLOATS[codec])}
    if codec in BITS:
        return quantize_rows(X, BITS[codec])
    if fam == "svd":
        A, B, _ = truncated_svd(X[None], rank)
        A, B = A[0], B[0]
        if kind == "fp16":
            return {"A": A.half(), "B": B.half()}
        return {"A": quantize_rows(A, 8), "B": quantize_rows(B, 8)}
    if fam in SHARED_BASIS:
        C = X @ basis[:, :rank]
        return {"C": C.half()} if kind == "fp16" else {"C": quantize_rows(C, BITS[kind])}
    raise ValueError(f"unknown codec '{codec}' (choose from {', '.join(CODECS)})")


def decode(codec, p, basis=None):
    fam = family(codec)
    if codec in FLOATS:
        return p["x"].float()
    if codec in BITS:
        return dequantize_rows(p)

    def part(v):
        return dequantize_rows(v) if isinstance(v, dict) else v.float()

    if fam == "svd":
        return part(p["A"]) @ part(p["B"])
    C = part(p["C"])
    return C @ basis[:, : C.shape[1]].T


def codec_settings(codecs, ranks, T, D, omega_rank):
    """(codec, rank) pairs to measure: rank codecs at each rank up to min(T, D) (omega: up to Ω's
    columns)."""
    out = []
    for c in codecs:
        if family(c) == "omega" and not omega_rank:
            continue
        if c in FLOATS or c in BITS:
            out.append((c, None))
        else:
            top = omega_rank if family(c) == "omega" else min(T, D)
            out += [(c, r) for r in ranks if r <= top]
    return out


# --------------------------------------------------------------------------------------------------
