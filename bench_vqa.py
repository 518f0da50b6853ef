"""
Downstream answering throughput: answers per second of vqa_eval's path (tower, transform, greedy
decoding) at several batch sizes, on the same questions and images, and whether every batch size
gives batch 1's answers.

    python bench_vqa.py                                                   (tiny-random on the CPU: the mechanics)
    python bench_vqa.py --model random-3b --device cuda --batch_sizes 1,8,32 --num 64      (real size, bf16)

The images are the demo set's photos (scikit-image), every question a different length; the
conditions are transform specs that need no training run (original, zeros, svd:r, keep:<rule>:k
except lrcp, codec:fp16/int8/...). One warm-up batch runs first at each batch size; then all --num
samples under every condition, timed as a whole.
"""

import argparse
import json
import time

import torch

from lowrank.cli import (
    HelpFormatter,
    UserError,
    add_device,
    add_dtype,
    out_file,
    parse_ints,
    pick_device,
    positive_int,
    run_cli,
)
from lowrank.demo_set import make_rows
from lowrank.downstream import PROMPT, Asker, Decoding, Item
from lowrank.encoders import TINY, default_dtype
from lowrank.images import load_image
from lowrank.metrics import synchronize
from lowrank.transforms import TokenSetup, check_spec, parse_spec
from lowrank.vlm import RANDOM_TEXT, load_vlm

QUESTIONS = (
    "what is written on the sign?",
    "what word is on it?",
    "what does the sign in this photo say, exactly?",
)


def get_args_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument(
        "--model",
        default=TINY,
        help=f"a full model built in code ({', '.join(RANDOM_TEXT)}) or a checkpoint",
    )
    add_device(ap)
    add_dtype(ap)
    ap.add_argument(
        "--num", type=positive_int, default=32, help="samples answered at every batch size"
    )
    ap.add_argument(
        "--batch_sizes", default="1,8,32", help="comma list; the first is the reference"
    )
    ap.add_argument(
        "--transforms", default="original,svd:64,keep:norm:64", help="conditions (transform specs)"
    )
    ap.add_argument(
        "--max_new_tokens", type=positive_int, default=8, help="greedy decoding length limit"
    )
    ap.add_argument("--json", default=None, help="write the figures here too")
    return ap


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    dev = pick_device(args.device)
    dtype = getattr(torch, args.dtype or default_dtype(dev))
    sizes = parse_ints(args.batch_sizes, "--batch_sizes")
    if not sizes or min(sizes) < 1:
        raise UserError(f"--batch_sizes {args.batch_sizes}: give positive batch sizes, e.g. 1,8,32")
    conds = [parse_spec(t, 256) for t in args.transforms.split(",") if t.strip()]
    if not conds:
        raise UserError("--transforms is empty: give at least one, e.g. original,svd:64")
    json_path = out_file(args.json, "--json") if args.json else None
    for spec in conds:
        if (
            spec.kind == "nn"
            or spec.rule == "lrcp"
            or spec.codec
            and spec.codec.startswith(("pca", "omega"))
        ):
            raise UserError(
                f"transform {spec}: needs a training run; bench_vqa.py takes the ones that do not"
            )
        # 448² images: 256 tokens; the feature dim is checked once the model is built
        check_spec(spec, 256, 256)
    model, proc = load_vlm(args.model, dev, dtype, (448, 448))
    for spec in conds:
        check_spec(spec, 256, model.config.vision_config.out_hidden_size)
    max_svd = max((s.rank for s in conds if s.kind == "svd"), default=0)

    def prompt(q):
        return PROMPT.format(question=q)

    setup = TokenSetup("layernorm", (16, 16), max_svd=max_svd)
    asker = Asker(model, proc, dtype, setup, Decoding(prompt, args.max_new_tokens))
    rows = make_rows(args.num, seed=0)
    items = [
        Item(i, load_image(r["image"]["bytes"], (448, 448)), QUESTIONS[i % len(QUESTIONS)], conds)
        for i, r in enumerate(rows)
    ]
    n_answers = len(items) * len(conds)
    print(
        f"{args.model} ({str(dtype).replace('torch.', '')} on {dev}): {len(items)} samples x {len(conds)} conditions "
        f"({', '.join(map(str, conds))}) = {n_answers} answers, up to {args.max_new_tokens} new tokens each"
    )
    results, ref = [], None
    for b in sizes:
        list(asker.ask(items[:b]))  # warm-up
        synchronize(dev)
        t = time.perf_counter()
        recs = [r for s in range(0, len(items), b) for r in asker.ask(items[s : s + b])]
        synchronize(dev)
        secs = time.perf_counter() - t
        answers = {(r["sample"], r["condition"]): r["tokens"] for r in recs}
        ref = ref or answers
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        results.append(
            {
                "batch_size": b,
                "answers_per_s": n_answers / secs,
                "seconds": secs,
                "equal_to_first": answers == ref,
                "differing": sum(answers[k] != ref[k] for k in ref),
                "peak_gpu_gib": peak,
            }
        )
    print(
        f"{'batch':>6}{'answers/s':>11}{'x first':>9}{'seconds':>9}  same answers as batch {sizes[0]}"
    )
    for r in results:
        r["speedup"] = r["answers_per_s"] / results[0]["answers_per_s"]
        same = "yes" if r["equal_to_first"] else f"no ({r['differing']} of {n_answers} differ)"
        print(
            f"{r['batch_size']:>6}{r['answers_per_s']:>11.2f}{r['speedup']:>9.2f}{r['seconds']:>9.1f}  {same}"
        )
    if json_path:
        json_path.write_text(
            json.dumps({"model": args.model, "device": str(dev), "rows": results}, indent=1)
        )
    return results


if __name__ == "__main__":
    run_cli(main)
