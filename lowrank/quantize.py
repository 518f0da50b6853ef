"""
Symmetric absmax quantisation of the rows of a matrix (int8, int4 packed two per byte): the one
quantiser of the feature codecs (feature_codecs.py) and of the compressed checkpoint format
(model.py). Pure torch.
"""

import torch


def quantize_rows(Y, bits):
    """Codes in [-q, q] (q = 2^(bits-1) - 1) and one float32 scale per row; int4 codes are packed
    two per byte."""
    q = 2 ** (bits - 1) - 1
    scale = (Y.abs().amax(-1) / q).clamp_min(torch.finfo(torch.float32).tiny).float()
    codes = torch.round(Y / scale[:, None]).clamp(-q, q).to(torch.int8)
    if bits == 4:
        flat = (codes.flatten() + 8).to(torch.uint8)
        flat = torch.cat([flat, flat.new_full((len(flat) % 2,), 8)])
        codes = flat[0::2] | (flat[1::2] << 4)
    return {"codes": codes, "scale": scale, "shape": torch.tensor(Y.shape)}


def dequantize_rows(p):
    shape = tuple(p["shape"].tolist())
    codes = p["codes"]
    if codes.dtype == torch.uint8:  # packed int4
        both = torch.stack([codes & 15, codes >> 4], 1).flatten()[: shape[0] * shape[1]]
        codes = both.to(torch.int8) - 8
    return codes.reshape(shape).float() * p["scale"][:, None]
