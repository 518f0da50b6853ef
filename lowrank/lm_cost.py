"""
What one image and prompt cost the model, from its configs alone: the vision tower's FLOPs on an
image's patch grid, the language model's prefill FLOPs and the KV-cache bytes of a prompt of n tokens
(text + vision). docs/scripts.md#cost writes the formulas out; the tests hold them to torch's FLOP
counter on the tiny models.
"""

import math

import numpy as np


def sizes(text_config):
    """(layers, hidden d, query width, key/value width, MLP width, vocabulary) of a decoder
    config."""
    c = text_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return (
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads * head_dim,
        c.num_key_value_heads * head_dim,
        c.intermediate_size,
        c.vocab_size,
    )


def prefill_flops(text_config, n, pruned=None):
    """FLOPs (2 per multiply-add) of one prefill over n tokens: per layer the q, k, v and o
    projections, the attention scores and their weighted sum over all n x n pairs (the field's
    convention, as FastV counts; a causal kernel does about half), a gated MLP of three matrices;
    then the logits of the last token only. pruned: (K, n') when only n' tokens remain after layer K
    (FastV; its ranking, one query row, is not counted)."""
    layers, d, dq, dkv, m, vocab = sizes(text_config)

    def per_layer(n):
        return 2 * n * d * (dq + 2 * dkv) + 2 * n * dq * d + 4 * n * n * dq + 6 * n * d * m

    K, after = pruned or (layers, n)
    return K * per_layer(n) + (layers - K) * per_layer(after) + 2 * d * vocab


def kv_bytes(text_config, n, element_bytes, pruned=None):
    """Bytes of the keys and values that n prompt tokens leave in the cache (pruned: as in
    prefill_flops)."""
    layers, _, _, dkv, _, _ = sizes(text_config)
    K, after = pruned or (layers, n)
    return 2 * dkv * (K * n + (layers - K) * after) * element_bytes


def window_spans(grid, merge, cells, keep=None):
    """Token counts of the attention windows of Qwen2.5-VL's windowed blocks: the h x w patch grid in
    windows of cells x cells merged cells (window_size / patch / merge; the edge windows are
    partial), each merged cell merge x merge patches; keep [rows·cols] bool (raster order): only
    the kept cells count (pixelprune)."""
    _, h, w = grid
    rows, cols = h // merge, w // merge
    kept = (
        np.ones((rows, cols), bool) if keep is None else np.asarray(keep, bool).reshape(rows, cols)
    )
    return [
        int(kept[r : r + cells, c : c + cells].sum()) * merge * merge
        for r in range(0, rows, cells)
        for c in range(0, cols, cells)
    ]


def tower_flops(vision_config, grid, keep=None):
    """FLOPs (2 per multiply-add) of the vision tower on one image's patch grid (t, h, w) =
    image_grid_thw, n = t·h·w patches of width d: the patch embedding (a linear map of each
    temporal_patch x patch x patch x 3 block), per block the q, k, v and output projections (8 n d²),
    the attention scores and weighted sum over each window (4 d Σ L², L = n in a full-attention
    block, Qwen2.5-VL's windows otherwise) and the MLP (6 n d i gated: Qwen2.5-VL; 4 n d i plain:
    Qwen2-VL, Qwen3-VL), then the merger on n / m² merged tokens (4d -> 4d -> out; Qwen3-VL's
    deepstack mergers as many more). Norms, activations, rotary and position embeddings (O(n d))
    are left out. keep [rows·cols] bool: only those merged cells' patches run (pixelprune)."""
    c = vision_config
    m = c.spatial_merge_size
    n = math.prod(grid) if keep is None else int(np.asarray(keep, bool).sum()) * m * m
    d = getattr(c, "embed_dim", None) or c.hidden_size  # Qwen2-VL calls the width embed_dim
    out = getattr(c, "out_hidden_size", None) or c.hidden_size  # Qwen2-VL: hidden_size is out
    gated = getattr(c, "fullatt_block_indexes", None) is not None  # Qwen2.5-VL's SwiGLU
    i = getattr(c, "intermediate_size", None) or int(d * c.mlp_ratio)
    full, windowed = 4 * d * n * n, 4 * d * n * n
    if gated:
        cells = c.window_size // c.patch_size // m
        windowed = 4 * d * sum(L * L for L in window_spans(grid, m, cells, keep))
    flops = 2 * n * (c.in_channels * c.temporal_patch_size * c.patch_size**2) * d
    for b in range(c.depth):
        attention = full if not gated or b in c.fullatt_block_indexes else windowed
        flops += 8 * n * d * d + attention + (6 if gated else 4) * n * d * i
    mergers = 1 + len(getattr(c, "deepstack_visual_indexes", None) or [])
    wide = d * m * m
    return flops + mergers * (2 * (n // (m * m)) * wide * (wide + out))
