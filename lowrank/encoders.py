"""
Qwen vision encoders: the families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) by their checkpoint's
model_type, towers built in code with random weights (tiny ones for offline runs, real-size ones for
cost figures), each family's image processor at a fixed size, and Encoder: PIL images -> [N, T, D]
vision tokens, what the language model sees.
"""

import importlib
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowrank.cli import UserError
from lowrank.images import parse_image_size

# --image_size: one side (square) or WxH; a multiple of the encoder's cell (28 or 32 px)
DEFAULT_IMAGE_SIZE = "448"
DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"

# Vision towers by the checkpoint's model_type: (transformers module, vision config class, vision
# model class, the config attribute that is the output (merger) dim). The tower's output is what the
# language model sees.
FAMILIES = {
    "qwen2_vl": (
        "qwen2_vl",
        "Qwen2VLVisionConfig",
        "Qwen2VisionTransformerPretrainedModel",
        "hidden_size",
    ),
    "qwen2_5_vl": (
        "qwen2_5_vl",
        "Qwen2_5_VLVisionConfig",
        "Qwen2_5_VisionTransformerPretrainedModel",
        "out_hidden_size",
    ),
    "qwen3_vl": ("qwen3_vl", "Qwen3VLVisionConfig", "Qwen3VLVisionModel", "out_hidden_size"),
    "qwen3_vl_moe": (
        "qwen3_vl_moe",
        "Qwen3VLMoeVisionConfig",
        "Qwen3VLMoeVisionModel",
        "out_hidden_size",
    ),
}
# Image normalisation of each family's own processor (preprocessor_config.json); used when a
# checkpoint has none.
FAMILY_MEAN_STD = {"qwen3_vl": ([0.5] * 3, [0.5] * 3), "qwen3_vl_moe": ([0.5] * 3, [0.5] * 3)}

# Towers built in code with random weights (fixed seed), selected by name, never a fallback. tiny-*:
# small and fast, one per family with different output dims, so every family's path runs offline.
# random-*: the published vision configs at real size, for speed, parameter and memory figures only
# (bench_extract.py).
TINY = "tiny-random"
TINY_SEED = 0
# a table: one tower a line reads better than the formatter's one argument a line
# fmt: off
_Q25 = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, hidden_act="silu")
_Q25_TOWER = dict(_Q25, depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                  fullatt_block_indexes=[7, 15, 23, 31])
_Q2_TOWER = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, patch_size=14,
                 spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")
_Q3_SMALL = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                 deepstack_visual_indexes=[5, 11, 17])
_Q3_LARGE = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                 deepstack_visual_indexes=[8, 16, 24])
RANDOM_TOWERS = {
    TINY: ("qwen2_5_vl", dict(_Q25, depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                              out_hidden_size=2048, fullatt_block_indexes=[1])),
    "tiny-random-qwen2-vl": ("qwen2_vl", dict(_Q2_TOWER, depth=2, embed_dim=64, mlp_ratio=2, num_heads=2,
                                              hidden_size=1536)),
    "tiny-random-qwen3-vl": ("qwen3_vl", dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                                              out_hidden_size=1024, deepstack_visual_indexes=[0],
                                              num_position_embeddings=144)),
    # Qwen2.5-VL-3B's tower
    "random-3b": ("qwen2_5_vl", dict(_Q25_TOWER, out_hidden_size=2048)),
    "random-qwen2.5-vl-7b": ("qwen2_5_vl", dict(_Q25_TOWER, out_hidden_size=3584)),
    "random-qwen2.5-vl-32b": ("qwen2_5_vl", dict(_Q25_TOWER, out_hidden_size=5120)),
    "random-qwen2.5-vl-72b": ("qwen2_5_vl", dict(_Q25_TOWER, out_hidden_size=8192)),
    "random-qwen2-vl-2b": ("qwen2_vl", dict(_Q2_TOWER, hidden_size=1536)),
    "random-qwen2-vl-7b": ("qwen2_vl", dict(_Q2_TOWER, hidden_size=3584)),
    "random-qwen2-vl-72b": ("qwen2_vl", dict(_Q2_TOWER, hidden_size=8192)),
    "random-qwen3-vl-2b": ("qwen3_vl", dict(_Q3_SMALL, out_hidden_size=2048)),
    "random-qwen3-vl-4b": ("qwen3_vl", dict(_Q3_SMALL, out_hidden_size=2560)),
    "random-qwen3-vl-8b": ("qwen3_vl", dict(_Q3_LARGE, out_hidden_size=4096)),
    "random-qwen3-vl-32b": ("qwen3_vl", dict(_Q3_LARGE, out_hidden_size=5120)),
}
# fmt: on
RANDOM_3B = "random-3b"


def default_dtype(device):
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def encoder_key(
    model, revision=None, dtype=None, device="cpu", image_size=DEFAULT_IMAGE_SIZE, layer=None
):
    """What identifies a cache's encoder, known before loading it (Encoder.info adds family, grid
    and dim). layer: where along the tower the features are taken (layer_names; 'merger', the
    tower's output, by default)."""
    w, h = parse_image_size(image_size)
    return {
        "model": str(model),
        "revision": revision,
        "dtype": dtype or default_dtype(device),
        "image_size": w if w == h else [w, h],
        "layer": layer or "merger",
    }


@dataclass(frozen=True)
class EncoderSpec:
    """Which tower makes a cache's features, known before it loads: key() identifies the cache's
    encoder (checked against an existing cache first), build() loads it."""

    model: str = DEFAULT_MODEL
    device: str | None = None  # default: cuda if the machine has it, else cpu
    dtype: str | None = None  # default: bfloat16 on CUDA, float32 on CPU
    revision: str | None = None
    image_size: str = DEFAULT_IMAGE_SIZE
    layer: str | None = None  # default: the merger's output

    def where(self):
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def key(self):
        return encoder_key(
            self.model, self.revision, self.dtype, self.where(), self.image_size, self.layer
        )

    def build(self):
        return Encoder(
            self.model, self.where(), self.dtype, self.revision, self.image_size, self.layer
        )


def family_classes(family):
    if family not in FAMILIES:
        raise UserError(
            f"model type '{family}' is not a supported vision-language family ({', '.join(FAMILIES)})"
        )
    mod, cfg_cls, model_cls, out_attr = FAMILIES[family]
    try:
        cfg_mod = importlib.import_module(f"transformers.models.{mod}.configuration_{mod}")
        model_mod = importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
    except ImportError:
        import transformers

        raise UserError(
            f"{family} needs a newer transformers than {transformers.__version__} (pip install -U transformers)"
        ) from None
    return getattr(cfg_mod, cfg_cls), getattr(model_mod, model_cls), out_attr


def hub_reachable(timeout=2.0):
    """False when the hub cannot be reached: HF_HUB_OFFLINE is set, or a TCP connection to the hub
    (HF_ENDPOINT's host if set) fails within timeout seconds. Checked once, before transformers
    would spend its retries."""
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout
        ).close()
        return True
    except OSError:
        return False


def checkpoint_family(model, revision=None):
    """The model_type in a checkpoint's config.json (local directory or hub id): qwen2_vl,
    qwen2_5_vl, qwen3_vl..."""
    return checkpoint_config(model, revision).model_type


def checkpoint_config(model, revision=None):
    """A checkpoint's config (local directory or hub id), or one UserError saying how to get it."""
    from transformers import AutoConfig

    advice = (
        "Give --model a local checkpoint directory (e.g. a ModelScope download: modelscope download --model "
        "Qwen/Qwen2.5-VL-3B-Instruct --local_dir ckpt/Qwen2.5-VL-3B-Instruct), use a pre-filled hub cache "
        "with HF_HUB_OFFLINE=1, or a mirror via HF_ENDPOINT. For an offline run without weights: "
        "--model tiny-random."
    )
    offline = not Path(model).is_dir() and not hub_reachable()
    try:
        return AutoConfig.from_pretrained(model, revision=revision, local_files_only=offline)
    # not found / no network; 4.x: HFValidationError for a bad path
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if offline:
            raise UserError(
                f"'{model}' is not a local directory, the hub is unreachable (offline) and the model is "
                f"not in the local hub cache. {advice}"
            ) from None
        raise UserError(f"could not load '{model}': {first}. {advice}") from None


def random_tower(name):
    """One of RANDOM_TOWERS, built in code with random weights from TINY_SEED: the same weights
    every time (vqa_eval.py puts the tiny one inside a full tiny Qwen2.5-VL, so its answers use the
    very features a tiny-random cache holds). -> (tower, family)"""
    family, cfg_kw = RANDOM_TOWERS[name]
    cfg_cls, model_cls, _ = family_classes(family)
    torch.manual_seed(TINY_SEED)
    return model_cls._from_config(cfg_cls(**cfg_kw), attn_implementation="sdpa"), family


def image_processor(vision_config, family, size, model=None, revision=None):
    """The family's image processor, fixed to exactly size = (W, H) pixels in (min_pixels =
    max_pixels = W·H, after the toolkit's own resize to W x H): (H/cell)·(W/cell) tokens, cell =
    patch x merge. A checkpoint's own preprocessor settings (mean/std) are used where it has
    them."""
    # transformers 5.x: the slow processor is the *Pil class; 4.x: Qwen2VLImageProcessor is the PIL
    # one
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil as Proc,
        )
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import (
            Qwen2VLImageProcessor as Proc,
        )
    cfg = vision_config
    cell = cfg.patch_size * cfg.spatial_merge_size
    w, h = size
    if w % cell or h % cell:
        raise UserError(
            f"--image_size {w}x{h}: each side must be a multiple of {cell} px for {family} "
            f"({cfg.patch_size}-px patches merged {cfg.spatial_merge_size}x{cfg.spatial_merge_size})"
        )
    proc_kw = dict(
        min_pixels=w * h,
        max_pixels=w * h,
        patch_size=cfg.patch_size,
        merge_size=cfg.spatial_merge_size,
        temporal_patch_size=cfg.temporal_patch_size,
    )
    if family in FAMILY_MEAN_STD:
        proc_kw["image_mean"], proc_kw["image_std"] = FAMILY_MEAN_STD[family]
    if model is not None and model not in RANDOM_TOWERS:
        try:
            return Proc.from_pretrained(model, revision=revision, **proc_kw)
        except OSError:
            pass
    return Proc(**proc_kw)


class Encoder:
    """A Qwen vision tower + its processor. __call__(list of PIL RGB images of image_size) -> [N, T,
    D] features, T = (H / cell) * (W / cell) tokens in raster order, cell = patch_size *
    spatial_merge_size (28 px for Qwen2-VL and Qwen2.5-VL, 32 px for Qwen3-VL), D = the merger's
    output dim (what the language model sees)."""

    def __init__(
        self,
        model=DEFAULT_MODEL,
        device="cpu",
        dtype=None,
        revision=None,
        image_size=DEFAULT_IMAGE_SIZE,
        layer=None,
    ):
        self.device = torch.device(device)
        key = encoder_key(model, revision, dtype, device, image_size, layer)
        self.layer = key["layer"]
        self.dtype = getattr(torch, key["dtype"])
        self.size = parse_image_size(image_size)
        if model in RANDOM_TOWERS:
            self.tower, family = random_tower(model)
            self.tower.to(self.dtype)
        else:
            family = checkpoint_family(model, revision)
            cfg_cls, model_cls, out_attr = family_classes(family)
            self.tower, info = model_cls.from_pretrained(
                model,
                revision=revision,
                key_mapping={r"^(?:model\.)?visual\.": "model."},
                dtype=self.dtype,
                attn_implementation="sdpa",
                output_loading_info=True,
            )
            if info["missing_keys"]:
                raise UserError(
                    f"'{model}': {len(info['missing_keys'])} vision-tower weights are missing from the "
                    f"checkpoint (e.g. {sorted(info['missing_keys'])[:3]}); refusing random weights."
                )
        self.tower.eval().to(self.device)
        cfg = self.tower.config
        self.processor = image_processor(cfg, family, self.size, model, revision)
        if self.layer not in layer_names(self.tower):
            raise UserError(
                f"--layer {self.layer}: {model}'s tower has {', '.join(layer_names(self.tower))}"
            )
        w, h = self.size
        merged = cfg.patch_size * cfg.spatial_merge_size
        rows, cols, cell = layer_grid(self.tower, self.layer, (h // merged, w // merged))
        self.grid = [rows, cols]  # of the layer's tokens
        self.dim = getattr(cfg, family_classes(family)[2])
        if is_patch_layer(self.layer):  # the blocks' width (Qwen2-VL calls it embed_dim)
            self.dim = getattr(cfg, "embed_dim", None) or cfg.hidden_size
        self.info = dict(
            key,
            family=family,
            cell=cell,
            grid=self.grid,
            layer=self.layer,
            feature_dim=self.dim,
            tiny_seed=TINY_SEED if model in RANDOM_TOWERS else None,
        )

    @torch.no_grad()
    def __call__(self, images):
        inputs = self.processor(images=images, return_tensors="pt")
        pv = inputs["pixel_values"].to(self.device, self.dtype)
        if self.layer != "merger":
            return tower_layers(
                self.tower, pv, inputs["image_grid_thw"].to(self.device), [self.layer]
            )[1][self.layer]
        out = self.tower(pv, grid_thw=inputs["image_grid_thw"].to(self.device))
        # 5.x returns an output object, 4.x the merged tokens
        out = getattr(out, "pooler_output", out)
        if isinstance(out, tuple):  # 4.x Qwen3-VL: (merged tokens, deepstack features)
            out = out[0]
        return out.reshape(len(images), self.grid[0] * self.grid[1], self.dim)


@torch.no_grad()
def attention_received(tower, pixel_values, grid_thw, check=False):
    """(the tower's output [N·T, D], attention [N, T]): for each image, the attention each merged
    token receives in the tower's last full-attention block, averaged over heads and queries and
    summed over the token's patches (VisionZip's dominance), in raster order like the output. sdpa
    returns no weights, so softmax(q kᵀ / √d) is recomputed from that block's own q and k (rotary
    applied) for the images at hand. check: also return {'recomputed', 'actual'} (that attention
    applied to v and the output projection, and the block's own attention output) and the
    un-permutation 'order'."""
    # Qwen2-VL: every block is full
    full = getattr(tower, "fullatt_block_indexes", None) or [len(tower.blocks) - 1]
    attn = tower.blocks[full[-1]].attn
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    seen = {}

    def grab(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        q, k, v = (
            module.qkv(h).reshape(len(h), 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        )
        q, k = rotary(q, k, *kwargs["position_embeddings"])
        bounds, recv, mixed = kwargs["cu_seqlens"].tolist(), [], []
        for s, e in zip(bounds[:-1], bounds[1:]):
            w = torch.softmax(
                torch.einsum("nhd,mhd->hnm", q[s:e].float(), k[s:e].float()) * module.scaling, -1
            )
            recv.append(w.mean((0, 1)))
            if check:
                mixed.append(torch.einsum("hnm,mhd->nhd", w, v[s:e].float()).reshape(e - s, -1))
        seen["patches"] = torch.cat(recv)
        if check:
            seen["recomputed"] = module.proj(torch.cat(mixed).to(h.dtype))

    def grab_output(module, args, kwargs, out):
        seen["actual"] = out

    hooks = [attn.register_forward_pre_hook(grab, with_kwargs=True)]
    hooks.append(tower.merger.register_forward_hook(lambda m, a, out: seen.update(merged=out)))
    if check:
        hooks.append(attn.register_forward_hook(grab_output, with_kwargs=True))
    out = run_hooked(tower, pixel_values, grid_thw, hooks)
    # window order, as the merger
    per_token = seen["patches"].reshape(-1, tower.spatial_merge_size**2).sum(1)
    order = raster_order(seen["merged"], out)
    att = per_token[order].reshape(len(grid_thw), -1)
    if check:
        return (
            out,
            att,
            {"recomputed": seen["recomputed"], "actual": seen["actual"], "order": order},
        )
    return out, att


def raster_order(window_ordered, raster):
    """The permutation p with raster == window_ordered[p] (the tower un-permutes its window order
    after the merger), read off the rows themselves: a random projection tells them apart."""
    r = torch.randn(
        window_ordered.shape[1], 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    a, b = (
        (window_ordered.double() @ r.to(raster.device))[:, 0],
        (raster.double() @ r.to(raster.device))[:, 0],
    )
    p = torch.empty_like(a, dtype=torch.long)
    p[b.argsort()] = a.argsort()
    if not torch.equal(window_ordered[p], raster):
        raise RuntimeError("the tower's output is not a permutation of its merger's output")
    return p


def layer_names(tower):
    """The places along the tower a layer study taps, in depth order: the patch embedding, every
    block, the merger (its input is the last block's output) and, for Qwen3-VL, the deepstack
    mergers (deepstack_<i>, after block i)."""
    names = ["patch_embed"] + [f"block_{i}" for i in range(len(tower.blocks))] + ["merger"]
    taps = getattr(tower.config, "deepstack_visual_indexes", None) or []
    return names + [f"deepstack_{i}" for i in taps]


def layer_module(tower, name):
    if name == "patch_embed" or name == "merger":
        return getattr(tower, name)
    kind, i = name.rsplit("_", 1)
    if kind == "block":
        return tower.blocks[int(i)]
    taps = list(tower.config.deepstack_visual_indexes)
    return tower.deepstack_merger_list[taps.index(int(i))]


def is_patch_layer(name):
    """Patch embedding and blocks hold one token per patch (14 px for Qwen2/2.5-VL); the mergers one
    per 2x2 cell."""
    return name == "patch_embed" or name.startswith("block_")


def layer_grid(tower, name, grid_hw):
    """(rows, columns, cell px) of a layer's tokens, from the merged grid_hw."""
    patch, merge = tower.config.patch_size, tower.config.spatial_merge_size
    if is_patch_layer(name):
        return grid_hw[0] * merge, grid_hw[1] * merge, patch
    return grid_hw[0], grid_hw[1], patch * merge


@torch.no_grad()
def tower_layers(tower, pixel_values, grid_thw, names=None):
    """(the tower's output [N·T, D], {name: [N, T_layer, D_layer]}) for the layers asked (default
    all of layer_names), every one in raster order. Qwen2.5-VL's blocks run on window-permuted merge
    units; the permutation is read off the merger's output against the tower's (raster_order),
    applied to each block's units, and then each unit's 2x2 patches are put back in their rows and
    columns (the processor groups them)."""
    names = names or layer_names(tower)
    seen = {}
    hooks = [
        layer_module(tower, n).register_forward_hook(lambda m, a, out, n=n: seen.update({n: out}))
        for n in names
    ]
    if "merger" not in names:
        hooks.append(tower.merger.register_forward_hook(lambda m, a, out: seen.update(merger=out)))
    out = run_hooked(tower, pixel_values, grid_thw, hooks)
    order = raster_order(seen["merger"], out)
    unit = tower.config.spatial_merge_size**2
    layers = {}
    for n in names:
        h = seen[n][0] if isinstance(seen[n], tuple) else seen[n]
        if n.startswith("block_"):  # window order of merge units -> the processor's order
            h = h.reshape(len(order), unit, -1)[order].reshape(len(order) * unit, -1)
        elif not is_patch_layer(n):
            h = h[order]
        layers[n] = per_image(h, grid_thw, tower.config.spatial_merge_size, is_patch_layer(n))
    return out, layers


def per_image(h, grid_thw, merge, patches):
    """[N, T, D] in raster order from the processor's order (merge units in raster order, each
    unit's patches in raster order inside it); merged tokens are in raster order already."""
    out, start = [], 0
    for t, gh, gw in grid_thw.tolist():
        n = t * gh * gw // (1 if patches else merge * merge)
        x = h[start : start + n]
        start += n
        if patches:
            x = (
                x.reshape(t, gh // merge, gw // merge, merge, merge, -1)
                .permute(0, 1, 3, 2, 4, 5)
                .reshape(n, -1)
            )
        out.append(x)
    return torch.stack(out)


def deepstack_of(out):
    """Qwen3-VL's deepstack features [levels, N·T, D] from a tower's output (5.x: an output object,
    4.x: a (merged, deepstack) tuple), or None for a tower without them."""
    levels = out[1] if isinstance(out, tuple) else getattr(out, "deepstack_features", None)
    return torch.stack(list(levels)) if levels else None


def repeated_cells(image, cell, tol=0):
    """PixelPrune's test (arXiv 2604.00886) on the image the tower sees -> keep [rows·cols] bool in
    raster order: False for a cell (one merged token's cell x cell pixels) whose pixels repeat a kept
    cell earlier in raster order, within tol (the largest absolute difference of any pixel
    channel, 0-255; 0: exactly equal)."""
    a = np.asarray(image.convert("RGB"), dtype=np.int16)
    rows, cols = a.shape[0] // cell, a.shape[1] // cell
    cells = a[: rows * cell, : cols * cell].reshape(rows, cell, cols, cell, 3)
    cells = cells.transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
    keep = np.ones(len(cells), dtype=bool)
    if tol == 0:  # exact: the first cell of each distinct content
        seen = {}
        for i, c in enumerate(cells):
            keep[i] = seen.setdefault(c.tobytes(), i) == i
    else:
        for i in range(1, len(cells)):
            kept = cells[:i][keep[:i]]
            keep[i] = np.abs(kept - cells[i]).max(1).min() > tol
    return torch.from_numpy(keep)


def pruned_tower(tower, pixel_values, grid_thw, keep):
    """The tower on one image's kept merged cells only (keep [rows·cols] bool, raster order), before
    it runs: PixelPrune's reduction. Every kept patch keeps its own rotary position (and on Qwen3-VL
    its own learned position embedding); in Qwen2.5-VL's windowed blocks it attends within its own
    window, less the removed cells; the full-attention blocks (and Qwen2-VL's, Qwen3-VL's blocks)
    see every kept patch; the merger merges each kept cell's own 2 x 2 patches, so a cell is
    removed whole. transformers 5's vision forward takes these as precomputed inputs (its
    vision_utils), given here for the kept patches. -> the tower's output (pooler_output: the kept
    cells' tokens in raster order)."""
    try:
        from transformers import vision_utils as vu
    except ImportError:
        raise UserError(
            "pixelprune needs transformers 5 (its vision towers take precomputed positions)"
        ) from None
    m = tower.spatial_merge_size
    keep = keep.to(pixel_values.device)
    patch = keep.repeat_interleave(m * m)
    n = int(patch.sum())
    kw = {
        "position_ids": vu.get_vision_position_ids(grid_thw, m)[patch],
        "cu_seqlens": torch.tensor([0, n], dtype=torch.int32, device=pixel_values.device),
    }
    if getattr(tower, "window_size", None):  # Qwen2.5-VL: each kept cell in its own window
        index, cu = vu.get_vision_window_index(grid_thw, m, tower.window_size, tower.patch_size)
        index, cu = index.to(keep.device), cu.to(keep.device)
        per_window = (cu[1:] - cu[:-1]) // (m * m)
        window = torch.repeat_interleave(
            torch.arange(len(per_window), device=keep.device), per_window
        )
        kept = keep[index]
        kw["window_index"] = (keep.cumsum(0) - 1)[index[kept]]
        sizes = torch.bincount(window[kept], minlength=len(per_window)) * m * m
        kw["cu_window_seqlens"] = torch.unique_consecutive(
            torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
        ).to(torch.int32)
    if getattr(tower, "num_grid_per_side", None):  # Qwen3-VL's learned position embedding
        idx, w = vu.get_vision_interpolation_indices_and_weights(
            grid_thw,
            num_grid_per_side=tower.num_grid_per_side,
            mode=tower.interpolation_mode,
            align_corners=tower.interpolation_align_corners,
            spatial_merge_size=m,
        )
        kw["interp_indices"], kw["interp_weights"] = idx[patch], w[patch]
    return tower(pixel_values[patch], grid_thw=grid_thw, **kw)


def run_hooked(tower, pixel_values, grid_thw, hooks):
    """The tower's merged output [N·T, D] (any transformers version's return type), its hooks
    removed after."""
    try:
        out = tower(pixel_values, grid_thw=grid_thw)
    finally:
        for hook in hooks:
            hook.remove()
    out = getattr(out, "pooler_output", out)
    return out[0] if isinstance(out, tuple) else out
