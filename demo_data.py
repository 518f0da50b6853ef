"""
Build a small data set in the TextVQA grounding schema from real photos that scikit-image ships
(demo_set.py says how). No network needed.

    python demo_data.py --out demo_data --num 300
"""

import argparse

from lowrank.cli import HelpFormatter, UserError, out_folder, positive_int, run_cli
from lowrank.demo_set import PHOTOS, make_rows, write_parquet


def get_args_parser():
    ap = argparse.ArgumentParser(
        description="Build a demo data set in the TextVQA grounding parquet schema from "
        "scikit-image's photos (offline).",
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--out", default="demo_data", help="output folder (parquet shards under data/)")
    ap.add_argument("--num", type=positive_int, default=300, help="number of samples")
    ap.add_argument("--shards", type=positive_int, default=3, help="number of parquet shards")
    ap.add_argument("--seed", type=int, default=0, help="crops, words and colours")
    ap.add_argument(
        "--photos",
        default=None,
        help=f"comma list of scikit-image photos (default all: {','.join(PHOTOS)})",
    )
    return ap


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    names = args.photos.split(",") if args.photos else None
    bad = set(names or []) - set(PHOTOS)
    if bad:
        raise UserError(f"--photos: unknown {sorted(bad)}; choose from {PHOTOS}")
    out = out_folder(args.out, "--out")
    if out.exists() and any(out.rglob("*.parquet")):
        print(f"{out} already holds parquet shards; leaving it as it is")
        return
    write_parquet(make_rows(args.num, args.seed, names), out, args.shards)
    print(f"wrote {args.num} samples in {args.shards} parquet shards under {out / 'data'}")


if __name__ == "__main__":
    run_cli(main)
