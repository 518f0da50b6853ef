"""
Feature-extraction throughput: images per second of preprocessing and of the vision tower, at
several batch sizes; and, with --towers, the size of every supported vision tower.

    python bench_extract.py --model random-3b --device cuda --batch_sizes 8,32      (real size, random weights)
    python bench_extract.py --model tiny-random-qwen3-vl --image_size 448x896 --batch_sizes 1,8
    python bench_extract.py --towers        (parameters, bf16 weight memory, tokens x dim of each published tower)
    python bench_extract.py --read_cache feature_cache_real      (cache read ms/image against cat)
"""

import argparse
import json
import time
from pathlib import Path

import torch

from lowrank.cli import HelpFormatter, add_device, add_dtype, pick_device, positive_int, run_cli
from lowrank.dataset import FeatureDataset
from lowrank.demo_set import make_rows
from lowrank.encoders import DEFAULT_IMAGE_SIZE, RANDOM_3B, RANDOM_TOWERS, Encoder, family_classes
from lowrank.feature_cache import cached_indices, feature_path, info_size, read_feature
from lowrank.images import load_image, parse_image_size


def tower_table(image_size):
    """Each real-size tower built from its published config (random weights, on the meta device: no
    memory)."""
    w, h = parse_image_size(image_size)
    print(
        f"{'tower (published config)':<24}{'family':<12}{'params':>10}{'bf16 weights':>14}{'cell':>6}"
        f"{f'tokens x dim at {w}x{h}':>26}"
    )
    rows = []
    for name, (family, kw) in RANDOM_TOWERS.items():
        if name.startswith("tiny"):
            continue
        cfg_cls, model_cls, out_attr = family_classes(family)
        cfg = cfg_cls(**kw)
        with torch.device("meta"):
            tower = model_cls._from_config(cfg)
        n = sum(p.numel() for p in tower.parameters())
        cell = cfg.patch_size * cfg.spatial_merge_size
        t = (h // cell) * (w // cell) if not (w % cell or h % cell) else None
        dim = getattr(cfg, out_attr)
        rows.append(
            {
                "tower": name,
                "family": family,
                "params": n,
                "bf16_gib": 2 * n / 2**30,
                "cell": cell,
                "tokens": t,
                "dim": dim,
            }
        )
        print(
            f"{name:<24}{family:<12}{n / 1e6:>9.1f}M{2 * n / 2**30:>12.2f} GiB{cell:>6}"
            f"{(f'{t} x {dim}' if t else f'not a multiple of {cell}'):>26}"
        )
    return rows


def read_speed(cache_dir, n=200, repeats=3):
    """ms per image to read a cache lazily through FeatureDataset (load, checks, normalisation)
    against `cat` of the same files (both warm in the page cache; best of `repeats`)."""
    import subprocess

    idx = cached_indices(cache_dir)[:n]
    files = [str(feature_path(cache_dir, i)) for i in idx]
    ds = FeatureDataset(cache_dir, idx, preload=False)
    t_cat, t_ds = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
        t_cat.append(time.perf_counter() - t)
        t = time.perf_counter()
        for k in range(len(ds)):
            ds[k]
        t_ds.append(time.perf_counter() - t)
    cat, rd = 1000 * min(t_cat) / len(idx), 1000 * min(t_ds) / len(idx)
    dtype = read_feature(files[0]).dtype
    print(
        f"{cache_dir} ({dtype}, {len(idx)} files): cat {cat:.3f} ms/image, FeatureDataset {rd:.3f} ms/image, "
        f"ratio {rd / cat:.1f}"
    )
    return cat, rd


def get_args_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument(
        "--model", default=RANDOM_3B, help="tiny-random*, random-*, a hub id or a checkpoint dir"
    )
    add_device(ap)
    add_dtype(ap)
    ap.add_argument("--image_size", default=DEFAULT_IMAGE_SIZE, help="448 or WxH")
    ap.add_argument("--batch_sizes", default="1,8", help="comma list")
    ap.add_argument(
        "--repeats", type=positive_int, default=3, help="timed runs per batch size, best kept"
    )
    ap.add_argument("--json", default=None, help="also write the speed rows to this JSON file")
    ap.add_argument(
        "--towers", action="store_true", help="print the size of every supported tower and exit"
    )
    ap.add_argument(
        "--read_cache",
        default=None,
        nargs="+",
        help="instead: time reading these caches through FeatureDataset against cat",
    )
    return ap


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.towers:
        return tower_table(args.image_size)
    if args.read_cache:
        return [read_speed(c) for c in args.read_cache]
    dev = pick_device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    enc = Encoder(args.model, dev, args.dtype, image_size=args.image_size)
    params = sum(p.numel() for p in enc.tower.parameters())
    rows = make_rows(max(int(b) for b in args.batch_sizes.split(",")), seed=0)
    images = [load_image(r["image"]["bytes"], info_size(enc.info)) for r in rows]
    print(
        f"{args.model} ({enc.info['family']}): {params / 1e6:.1f}M parameters, {enc.info['dtype']} on {dev}, "
        f"{enc.info['grid'][0]}x{enc.info['grid'][1]} tokens x {enc.info['feature_dim']}, "
        f"threads {torch.get_num_threads()}"
    )
    print(f"{'batch':>6}{'preprocess img/s':>18}{'tower img/s':>14}{'both img/s':>12}")
    out = []
    for b in (int(b) for b in args.batch_sizes.split(",")):
        ims = images[:b]
        enc(ims)  # warm-up
        t_pre, t_fwd = [], []
        with torch.no_grad():
            for _ in range(args.repeats):
                t = time.perf_counter()
                inputs = enc.processor(images=ims, return_tensors="pt")
                t_pre.append(time.perf_counter() - t)
                pv, grid = (
                    inputs["pixel_values"].to(dev, enc.dtype),
                    inputs["image_grid_thw"].to(dev),
                )
                sync()
                t = time.perf_counter()
                enc.tower(pv, grid_thw=grid)
                sync()
                t_fwd.append(time.perf_counter() - t)
        pre, fwd = min(t_pre), min(t_fwd)
        print(f"{b:>6}{b / pre:>18.1f}{b / fwd:>14.2f}{b / (pre + fwd):>12.2f}")
        out.append(
            {
                "batch": b,
                "preprocess_img_s": b / pre,
                "tower_img_s": b / fwd,
                "both_img_s": b / (pre + fwd),
            }
        )
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    if peak is not None:
        print(f"peak GPU memory {peak:.2f} GiB")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "model": args.model,
                    "device": str(dev),
                    "dtype": enc.info["dtype"],
                    "params": params,
                    "peak_gib": peak,
                    "rows": out,
                },
                indent=1,
            )
        )
    return out


if __name__ == "__main__":
    run_cli(main)
