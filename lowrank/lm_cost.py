"""
What one prompt costs the language model, from its config alone: the prefill FLOPs and the KV-cache
bytes of a prompt of n tokens (text + vision). docs/scripts.md#cost writes the formula out and
checks it on the tiny model.
"""


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
