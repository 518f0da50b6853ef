"""
The extraction script and the data loader. Run it to extract a cache of Qwen vision-token features
(one features_<i>.pt of [T, D] per image, e.g. [256, 2048] for Qwen2.5-VL-3B at 448x448, plus
manifest.json, the one record of T, D and the token grid); `from qwenvl_dataloader import
FeatureDataset` still works (it lives in lowrank/dataset.py).

    python qwenvl_dataloader.py --dataset_dir data/textvqa --model Qwen/Qwen2.5-VL-3B-Instruct
    python qwenvl_dataloader.py --dataset_dir demo_data --model tiny-random --cache_dir feature_cache_real

Under torchrun each process takes the indices rank::world_size and merges its samples into the one
manifest under the cache's lock, as separate extraction processes do.
"""

import argparse
from pathlib import Path

import torch

from lowrank.cli import (
    HelpFormatter,
    add_device,
    add_dtype,
    dist_env,
    nonneg_int,
    positive_int,
    run_cli,
)
from lowrank.dataset import FeatureDataset, make_loader  # noqa: F401  (the seed's import path)
from lowrank.encoders import DEFAULT_IMAGE_SIZE, DEFAULT_MODEL, TINY, EncoderSpec
from lowrank.extraction import Part, extract
from lowrank.feature_cache import MANIFEST, SAMPLE_LOG


def get_args_parser():
    ap = argparse.ArgumentParser(
        description="Extract and cache Qwen vision-token features (Qwen2-VL, Qwen2.5-VL, "
        "Qwen3-VL): one [T, D] tensor per image, e.g. [256, 2048] for "
        "Qwen2.5-VL-3B at 448x448.",
        formatter_class=HelpFormatter,
    )
    ap.add_argument(
        "--dataset_dir",
        "--source",
        dest="dataset_dir",
        required=True,
        help="TextVQA parquet directory, a folder of images (recursive), or a .jsonl list",
    )
    ap.add_argument("--cache_dir", default="feature_cache_real", help="where features_<i>.pt go")
    ap.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub id or local checkpoint dir of any Qwen2-VL / Qwen2.5-VL / Qwen3-VL model (the family is "
        f"read from its config); '{TINY}' (Qwen2.5-VL), 'tiny-random-qwen2-vl', "
        f"'tiny-random-qwen3-vl' = tiny offline encoders with random weights; 'random-3b', "
        f"'random-qwen3-vl-8b', ... = real-size towers with random weights, for speed measurements only",
    )
    ap.add_argument(
        "--image_size",
        default=DEFAULT_IMAGE_SIZE,
        help="resize every image to this: one side (448) or WxH (448x896); each side a multiple of the "
        "encoder's cell (28 px for Qwen2/2.5-VL, 32 px for Qwen3-VL); tokens = (H/cell) x (W/cell)",
    )
    ap.add_argument("--revision", default=None, help="hub revision of --model")
    add_device(ap)
    add_dtype(ap, "the tower's dtype")
    ap.add_argument(
        "--layer",
        default="merger",
        help="where along the tower: merger (its output, what the language model sees), patch_embed or block_<i> "
        "(one token per patch, raster order; the last block is the merger's input), deepstack_<i> (Qwen3-VL); "
        "layers.py reports every one",
    )
    ap.add_argument(
        "--extract_batch_size", type=positive_int, default=8, help="images per forward call"
    )
    ap.add_argument("--start", type=nonneg_int, default=0, help="first sample index")
    ap.add_argument("--limit", type=positive_int, default=None, help="at most this many samples")
    ap.add_argument(
        "--rebuild_manifest",
        action="store_true",
        help=f"rebuild {MANIFEST} from the cache's sample log ({SAMPLE_LOG}): files it vouches for "
        f"(same encoder, same image bytes) are kept, the rest re-extracted",
    )
    return ap


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    rank, world, local_rank = dist_env()
    device = args.device
    if device is None and torch.cuda.is_available():
        device = f"cuda:{local_rank}"
    s = extract(
        args.dataset_dir,
        args.cache_dir,
        EncoderSpec(
            args.model,
            device,
            dtype=args.dtype,
            revision=args.revision,
            image_size=args.image_size,
            layer=args.layer,
        ),
        part=Part(start=args.start, limit=args.limit, rank=rank, world_size=world),
        batch_size=args.extract_batch_size,
        rebuild_manifest=args.rebuild_manifest,
    )
    if world > 1:
        import torch.distributed as dist

        totals = torch.tensor([s["extracted"], s["skipped"], s["failed"]], dtype=torch.float64)
        dist.all_reduce(totals)
        dist.barrier()
        s["extracted"], s["skipped"], s["failed"] = (int(v) for v in totals.tolist())
        dist.destroy_process_group()
    if rank == 0:
        rate = (
            f"{s['images_per_second']:.1f} images/s{' on rank 0' if world > 1 else ''}"
            if s["extracted"]
            else "nothing to extract"
        )
        print(
            f"extracted {s['extracted']}, skipped {s['skipped']} (already cached), failed {s['failed']}; "
            f"{rate}; cache: {args.cache_dir}"
        )
        if s["failed"]:
            print(
                f"failures and their reasons are listed under 'failed' in {Path(args.cache_dir) / MANIFEST}"
            )


if __name__ == "__main__":
    run_cli(main)
