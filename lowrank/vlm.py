"""
The full Qwen-VL (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) as the downstream evaluation uses it: loaded from
a checkpoint or built in code with random weights (tiny-random* prove the mechanics on a CPU, one per
family; random-3b has Qwen2.5-VL-3B's published sizes, for cost figures), its M-RoPE positions
computed here, greedy decoding from embeddings (with Qwen3-VL's deepstack features added where the
image tokens are), and an answer with the vision tokens replaced.
"""

import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lowrank.cli import UserError
from lowrank.encoders import (
    FAMILIES,
    RANDOM_3B,
    RANDOM_TOWERS,
    TINY,
    TINY_SEED,
    checkpoint_config,
    checkpoint_family,
    family_classes,
    image_processor,
    random_tower,
)
from lowrank.metrics import timed

SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen2.5-VL's chat layout (default system turn, image as
# <|vision_start|><|image_pad|><|vision_end|>), for the tiny model only: a real checkpoint brings
# its own template.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m.role != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}"
    "{% else %}{% for c in m.content %}{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens, no merges) with Qwen's special tokens, built in
    code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=t,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL[1:],
    )


# The full model of each family in transformers: (model class, config class, processor class).
VLM_CLASSES = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLConfig", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", "Qwen2_5_VLProcessor"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLConfig", "Qwen3VLProcessor"),
    "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeConfig", "Qwen3VLProcessor"),
}


def vlm_class(family, which):
    """One of VLM_CLASSES[family] (which: 0 model, 1 config, 2 processor), imported."""
    import transformers

    return getattr(transformers, VLM_CLASSES[family][which])


def make_processor(tokenizer, image_processor, chat_template, family="qwen2_5_vl"):
    """transformers' processor of the family (chat template, <|image_pad|> expansion) without a
    video processor, whose class check needs torchvision: images only here."""

    class ImageOnlyProcessor(vlm_class(family, 2)):
        def check_argument_for_proper_class(self, name, arg):
            return (
                None
                if name == "video_processor" and arg is None
                else super().check_argument_for_proper_class(name, arg)
            )

    return ImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template
    )


# Full models built in code with random weights: the text side of each; the vision side (and the
# family) is RANDOM_TOWERS[name]. The tiny ones prove the mechanics in seconds on a CPU, one per
# family; random-3b has Qwen2.5-VL-3B's published sizes, for ms/sample and memory figures on a GPU
# without the weights (bench_gpu.sh). Two layers, so that FastV can prune after layer 1; each
# M-RoPE section list sums to half the head dim.
_TINY_TEXT = dict(
    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=256
)
RANDOM_TEXT = {
    TINY: dict(
        _TINY_TEXT,
        vocab_size=None,
        rope_scaling={"type": "mrope", "mrope_section": [256, 128, 128]},
    ),
    "tiny-random-qwen2-vl": dict(
        _TINY_TEXT, vocab_size=None, rope_scaling={"type": "mrope", "mrope_section": [96, 144, 144]}
    ),
    # Qwen3-VL's text model: its own head dim, and the sections interleaved over the frequencies
    "tiny-random-qwen3-vl": dict(
        _TINY_TEXT,
        vocab_size=None,
        head_dim=128,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
    ),
    RANDOM_3B: dict(
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        intermediate_size=11008,
        vocab_size=151936,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    ),
}


def random_config(name, tokenizer):
    """The family's config of a RANDOM_TEXT model, its special tokens those of tokenizer."""
    ids = dict(zip(SPECIAL, tokenizer.convert_tokens_to_ids(SPECIAL)))
    family, vision = RANDOM_TOWERS[name]
    text = dict(
        RANDOM_TEXT[name],
        hidden_size=vision[FAMILIES[family][3]],  # the merger's output is the text width
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    text["vocab_size"] = text["vocab_size"] or len(tokenizer)
    return vlm_class(family, 1)(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=text.get("tie_word_embeddings", False),
    )


def random_vlm(name, tokenizer, device):
    """A full model of the tower's family with random weights from TINY_SEED, built on device; its
    vision tower carries the weights of the encoder of the same name, so a cache extracted with
    --model <name> holds exactly its vision tokens."""
    torch.manual_seed(TINY_SEED)
    with torch.device(device):
        model = vlm_class(RANDOM_TOWERS[name][0], 0)._from_config(
            random_config(name, tokenizer), attn_implementation="sdpa"
        )
    model.model.visual.load_state_dict(random_tower(name)[0].state_dict())
    return model


def load_vlm(name, device, dtype, size, revision=None):
    """-> (model in eval mode, processor). One of RANDOM_TEXT (built in code) or a Qwen2-VL,
    Qwen2.5-VL or Qwen3-VL checkpoint (local directory or hub id)."""
    if name in RANDOM_TEXT:
        family, tok = RANDOM_TOWERS[name][0], tiny_tokenizer()
        model = random_vlm(name, tok, device)
        proc = make_processor(
            tok, image_processor(model.config.vision_config, family, size), CHAT_TEMPLATE, family
        )
        return model.to(device, dtype).eval(), proc
    if name in RANDOM_TOWERS:
        raise UserError(
            f"--model {name}: a vision tower only; vqa_eval needs a full model "
            f"({', '.join(RANDOM_TEXT)} built in code, or a Qwen-VL checkpoint)"
        )
    family = checkpoint_family(name, revision)
    if family not in VLM_CLASSES:
        raise UserError(
            f"--model {name} is a {family} checkpoint; the downstream model is one of "
            f"{', '.join(VLM_CLASSES)}"
        )
    from transformers import AutoTokenizer

    model = vlm_class(family, 0).from_pretrained(
        name, revision=revision, dtype=dtype, attn_implementation="sdpa"
    )
    tok = AutoTokenizer.from_pretrained(name, revision=revision)
    template = tok.chat_template
    # newer checkpoints keep the template in chat_template.json(.jinja), beside the processor config
    try:
        from transformers import AutoProcessor

        template = AutoProcessor.from_pretrained(name, revision=revision).chat_template or template
    # e.g. the video processor needs torchvision: the tokenizer's template is the same
    except Exception:
        pass
    proc = make_processor(
        tok,
        image_processor(model.config.vision_config, family, size, name, revision),
        template,
        family,
    )
    return model.to(device).eval(), proc


def vision_config(name, revision=None):
    """The vision config of a model built in code or of a checkpoint, from its config alone."""
    if name in RANDOM_TOWERS:
        family, kw = RANDOM_TOWERS[name]
        return family_classes(family)[0](**kw)
    return checkpoint_config(name, revision).vision_config


def feature_levels(name, revision=None):
    """The feature matrices the language model reads per image: 1, plus Qwen3-VL's deepstack
    levels."""
    return 1 + len(getattr(vision_config(name, revision), "deepstack_visual_indexes", None) or [])


def model_cell(name, revision=None):
    """The pixels on a side of one vision token: patch x merge (28 for Qwen2-VL and Qwen2.5-VL, 32
    for Qwen3-VL)."""
    cfg = vision_config(name, revision)
    return cfg.patch_size * cfg.spatial_merge_size


def mrope_positions(input_ids, image_token_id, grid_hw):
    """[3, L] M-RoPE positions (time, row, column) of one sequence holding one image of grid_hw
    merged tokens, as Qwen2-VL / Qwen2.5-VL number them: text counts up on all three axes; the
    image's token at (row, col) gets (s, s + row, s + col), s = the position after the preceding
    text; the text after the image resumes at s + max(rows, cols)."""
    ids = input_ids.tolist()
    L = len(ids)
    start = ids.index(image_token_id)
    h, w = grid_hw
    pos = torch.zeros(3, L, dtype=torch.long)
    pos[:, :start] = torch.arange(start)
    rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    pos[0, start : start + h * w] = start
    pos[1, start : start + h * w] = start + rows
    pos[2, start : start + h * w] = start + cols
    after = torch.arange(L - start - h * w) + start + max(h, w)
    pos[:, start + h * w :] = after
    return pos


@dataclass
class Prompt:
    """One prompt as the language model reads it: embeddings [L, H], M-RoPE positions [3, L], and
    for Qwen3-VL the deepstack features [levels, n, H] of its n image tokens, in order, that the
    first `levels` layers add to those tokens' hidden states (None for the other families)."""

    embeds: torch.Tensor
    positions: torch.Tensor
    deepstack: torch.Tensor | None = None
    image: torch.Tensor | None = None  # [L] bool: where the image tokens are

    def __len__(self):
        return len(self.embeds)


def prompt_embeds(model, ids, positions, V, kept, image_token_id, *, deepstack=None):
    """The Prompt of ids with the image tokens' embeddings replaced by V [T, D]; with kept indices,
    V [k, D] holds only the kept tokens: they keep their own positions and the other image tokens
    leave the sequence. deepstack [levels, T or k, D]: Qwen3-VL's, the rows of V's tokens."""
    embeds = model.get_input_embeddings()(ids)
    positions = positions.to(ids.device)
    is_image = ids == image_token_id
    img = is_image.nonzero().squeeze(1)
    keep = torch.ones(len(ids), dtype=torch.bool, device=ids.device)
    if kept is None:
        embeds[img] = V.to(embeds.dtype)
    else:
        kept = kept.to(ids.device)
        keep[img] = False
        keep[img[kept]] = True
        embeds[img[kept]] = V.to(embeds.dtype)
    if deepstack is not None:
        deepstack = deepstack.to(ids.device, embeds.dtype)
    image = is_image[keep] if deepstack is not None else None
    return Prompt(embeds[keep], positions[:, keep], deepstack, image)


@dataclass(frozen=True)
class FastV:
    """FastV inside the language model: from layer `layer` on only the k image tokens the last prompt
    token attends to most remain; image_positions: where the image tokens are in the prompt."""

    layer: int
    k: int
    image_positions: torch.Tensor


def fastv_hooks(model, fastv, n):
    """Hooks that make one prefill of n tokens (batch 1) FastV's (arXiv 2403.06764): the last prompt
    token's attention in layer `layer` - 1, averaged over heads and recomputed from that layer's own
    q and k (sdpa returns no weights), ranks the image tokens at image_positions; from layer `layer`
    on only the k best of them and the text remain, in the sequence and in those layers' KV cache;
    later steps attend to what each layer's cache holds. fastv: a FastV."""
    layer, k, image_positions = fastv.layer, fastv.k, fastv.image_positions
    layers = model.model.language_model.layers
    attn, state = layers[layer - 1].self_attn, {}
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb

    def rank(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if h.shape[1] != n:  # a decoding step
            return
        cos, sin = kwargs["position_embeddings"]
        q = module.q_proj(h[:, -1:]).view(1, 1, -1, module.head_dim).transpose(1, 2)
        key = module.k_proj(h).view(1, n, -1, module.head_dim).transpose(1, 2)
        q, key = rotate(q, q, cos[:, -1:], sin[:, -1:])[0], rotate(key, key, cos, sin)[0]
        key = key.repeat_interleave(module.num_key_value_groups, dim=1)
        w = torch.softmax((q @ key.transpose(2, 3)).float() * module.scaling, -1)[0, :, 0].mean(0)
        best = image_positions[w[image_positions].topk(k).indices]
        keep = torch.ones(n, dtype=torch.bool, device=h.device)
        keep[image_positions] = False
        keep[best] = True
        state.update(keep=keep, attention=w)

    def prune(module, args, kwargs):
        keep = state["keep"]
        h = args[0] if args else kwargs.pop("hidden_states")
        cos, sin = kwargs["position_embeddings"]
        # the prefill: the tokens, their positions and the mask lose the pruned ones
        if cos.shape[1] == n:
            h = h[:, keep] if h.shape[1] == n else h
            kwargs["position_embeddings"] = (cos[:, keep], sin[:, keep])
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            cols = torch.cat([keep, keep.new_ones(mask.shape[-1] - n)])
            kwargs["attention_mask"] = (
                mask[..., keep, :][..., cols] if mask.shape[-2] == n else mask[..., cols]
            )
        return (h, *args[1:]), kwargs

    hooks = [attn.register_forward_pre_hook(rank, with_kwargs=True)]
    hooks += [
        layers[j].register_forward_pre_hook(prune, with_kwargs=True)
        for j in range(layer, len(layers))
    ]
    return hooks, state


@torch.no_grad()
def greedy(model, prompts, max_new_tokens, eos_ids, fastv=None, cache=None):
    """Greedy decoding of a batch of Prompts -> (the new token ids of each, until its first eos id;
    {'prefill_s', 'decode_s': median seconds of one later step, 'total_s'}, for the whole batch).
    Prompts of different lengths are left-padded and masked; each sample's new tokens take positions
    max + 1, max + 2, ... of its own prompt on all three axes (what the model's own generate does
    after an image). fastv: a FastV prunes inside the language model (fastv_hooks; one prompt at a
    time). cache: a DynamicCache to fill (a test reads it afterwards). The language model is called
    as the family's own forward calls it once it has placed the image: embeddings, positions and,
    for Qwen3-VL, the deepstack features and where the image tokens are (the prefill only: later
    tokens are text)."""
    from transformers import DynamicCache

    first = prompts[0].embeds
    dev, B, L = first.device, len(prompts), max(len(p) for p in prompts)
    x = torch.zeros(B, L, first.shape[1], dtype=first.dtype, device=dev)
    pos = torch.zeros(3, B, L, dtype=torch.long, device=dev)
    mask = torch.zeros(B, L, dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        x[b, L - len(p) :], pos[:, b, L - len(p) :], mask[b, L - len(p) :] = (
            p.embeds,
            p.positions,
            1,
        )
    extra = {}
    if (
        prompts[0].deepstack is not None
    ):  # the image tokens of the batch in order, as the mask reads them
        image = torch.zeros(B, L, dtype=torch.bool, device=dev)
        for b, p in enumerate(prompts):
            image[b, L - len(p) :] = p.image
        stacked = torch.cat([p.deepstack for p in prompts], 1)
        extra = dict(visual_pos_masks=image, deepstack_visual_embeds=list(stacked))
    nxt = pos.amax(dim=(0, 2)) + 1
    cache = DynamicCache() if cache is None else cache
    lm = model.model.language_model
    # 5.x / 4.x
    cache_kw = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

    def step(x, pos, mask, extra):
        h = lm(
            inputs_embeds=x,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{cache_kw: cache},
            **extra,
        ).last_hidden_state
        return model.lm_head(h[:, -1])

    out, alive, times = [[] for _ in prompts], [True] * B, []
    hooks = fastv_hooks(model, fastv, L)[0] if fastv else []
    try:
        for _ in range(max_new_tokens):
            logits, secs = timed(step, x, pos, mask, extra, device=dev)
            times.append(secs)
            toks = logits.argmax(-1)
            for b, t in enumerate(toks.tolist()):
                if alive[b]:
                    out[b].append(t)
                    alive[b] = t not in eos_ids
            if not any(alive):
                break
            x, pos = model.get_input_embeddings()(toks[:, None]), nxt[None, :, None].expand(3, B, 1)
            mask, nxt, extra = torch.cat([mask, mask.new_ones(B, 1)], 1), nxt + 1, {}
    finally:
        for h in hooks:
            h.remove()
    decode = sorted(times[1:])
    return out, {
        "prefill_s": times[0],
        "decode_s": decode[len(decode) // 2] if decode else None,
        "total_s": sum(times),
    }


def decode_answer(proc, tokens):
    """The answer's text; ids beyond the tokenizer (random-3b's vocabulary is larger than the byte
    tokenizer's) are left out."""
    return proc.tokenizer.decode(
        [t for t in tokens if t < len(proc.tokenizer)], skip_special_tokens=True
    ).strip()


def answer(model, proc, prompt, max_new_tokens, eos_ids):
    """(text, token ids) of one greedy answer to a Prompt (prompt_embeds: the image tokens
    replaced)."""
    out = greedy(model, [prompt], max_new_tokens, eos_ids)[0][0]
    return decode_answer(proc, out), out


def check_max_new_tokens(model, n, prompt_tokens=0):
    """--max_new_tokens within the language model's context (its max_position_embeddings), before
    decoding."""
    cfg = getattr(model.config, "text_config", model.config)
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit is not None and n + prompt_tokens > limit:
        raise UserError(
            f"--max_new_tokens {n}: with the prompt's {prompt_tokens} tokens it passes the model's context of "
            f"{limit} positions"
        )


def question_embedder(name, revision=None):
    """question -> its token embeddings [q, D] from the language model's own input-embedding table
    (what the question-aware token rules compare the vision tokens with), loading only that table:
    the tiny model is built in code; a checkpoint's tokenizer and its embed_tokens tensor are read,
    nothing else."""
    if name in RANDOM_TEXT:
        if name != "tiny-random":
            raise UserError(
                f"{name}: a real-size model with random weights; its embeddings rank nothing"
            )
        tok = tiny_tokenizer()
        table = random_vlm(name, tok, "cpu").get_input_embeddings().weight.detach()
    else:
        table, tok = checkpoint_embeddings(name, revision)

    def embed(question):
        ids = tok(question, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError(f"the question {question!r} has no tokens")
        return table[torch.tensor(ids)].float()

    return embed


def checkpoint_embeddings(name, revision=None):
    """(the embed_tokens weight [V, D], the tokenizer) of a Qwen-VL checkpoint, read from its
    safetensors alone."""
    from huggingface_hub import hf_hub_download
    from safetensors import safe_open
    from transformers import AutoTokenizer

    def file(f):
        local = Path(name) / f
        return local if local.exists() else Path(hf_hub_download(name, f, revision=revision))

    try:
        index = json.loads(file("model.safetensors.index.json").read_text())["weight_map"]
    except Exception:
        index = None
    shard = "model.safetensors"
    if index is not None:
        key = next(k for k in index if k.endswith("embed_tokens.weight"))
        shard = index[key]
    with safe_open(str(file(shard)), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("embed_tokens.weight"))
        table = f.get_tensor(key)
    return table, AutoTokenizer.from_pretrained(name, revision=revision)
