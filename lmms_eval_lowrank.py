"""
Any lmms-eval image task with vision-token transforms: lmms-eval's task prompts, generation settings and scoring,
unchanged; the toolkit's Qwen2.5-VL with each transform applied where the tower's output enters the language model.

    python lmms_eval_lowrank.py --model Qwen/Qwen2.5-VL-3B-Instruct --device cuda --dtype bfloat16 \\
        --transforms original,svd:64,keep:leverage:64 --tasks textvqa_val,docvqa_val,chartqa
    python lmms_eval_lowrank.py --model tiny-random --parquet_dir demo_data --transforms original,svd:16,zeros --limit 8

--parquet_dir adds the task textvqa_local: TextVQA's lmms-eval prompt and scoring over a local parquet in the
toolkit's schema (offline). --results_dir takes a training run for nn:r, keep:lrcp:k and codec transforms.
Writes <out_dir>/lmms_eval.json: per transform, lmms-eval's results and every answer. Needs lmms-eval:
    pip install -r requirements-lmms-deps.txt && pip install --no-deps -r requirements-lmms.txt
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from lowrank.cli import HelpFormatter, UserError, positive_int, run_cli
from lowrank.downstream import default_batch_size, fit_bases
from lowrank.encoders import DEFAULT_IMAGE_SIZE, default_dtype
from lowrank.feature_cache import cache_grid, cache_image_size
from lowrank.images import parse_image_size
from lowrank.lmms_model import INSTALL, LowRankQwen
from lowrank.runs import load_run, read_run
from lowrank.selection import LRCP_RANK
from lowrank.transforms import parse_spec

ROOT = Path(__file__).resolve().parent
LOCAL_TASK = "textvqa_local"


def get_args_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument(
        "--model",
        required=True,
        help="a Qwen2.5-VL checkpoint (directory or hub id), or tiny-random / "
        "random-3b (built in code, random weights: mechanics and cost, not accuracy)",
    )
    ap.add_argument("--transforms", default="original", help="comma list of transform specs (transforms.py)")
    ap.add_argument("--tasks", default=None, help=f"lmms-eval task names (default: {LOCAL_TASK} with --parquet_dir)")
    ap.add_argument("--parquet_dir", default=None, help=f"a local TextVQA-schema parquet folder: the task {LOCAL_TASK}")
    ap.add_argument("--include_path", default=None, help="more lmms-eval task folders (YAML)")
    ap.add_argument("--limit", type=positive_int, default=None, help="the first N documents of each task")
    ap.add_argument("--results_dir", default=None, help="a training run: its factoriser, bases and normalisation")
    ap.add_argument("--image_size", default=DEFAULT_IMAGE_SIZE, help="images are resized to this (the run's cache's)")
    ap.add_argument("--max_new_tokens", type=positive_int, default=16, help="when the task sets none")
    ap.add_argument(
        "--batch_size",
        type=positive_int,
        default=None,
        help="documents answered together (default 32 on CUDA, 8 on CPU; 1: one at a time)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    ap.add_argument("--dtype", default=None, help="model dtype (default bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--seed", type=int, default=0, help="the random token rule")
    ap.add_argument("--out_dir", default="lmms_results", help="where lmms_eval.json goes")
    return ap


def local_task(parquet_dir, folder):
    """The textvqa_local task over parquet_dir, written as a task YAML into folder (an lmms-eval include path)."""
    shutil.copy(ROOT / "lmms_tasks" / LOCAL_TASK / "utils.py", folder / "utils.py")
    yaml = (ROOT / "lmms_tasks" / LOCAL_TASK / f"{LOCAL_TASK}.yaml").read_text()
    (folder / f"{LOCAL_TASK}.yaml").write_text(yaml.replace("DATASET_PATH", str(Path(parquet_dir).resolve())))


def run_setup(args):
    """(size, token grid, normalisation, factoriser, bases) from --results_dir, or the defaults without one."""
    specs = [parse_spec(t) for t in args.transforms.split(",") if t.strip()]
    if not args.results_dir:
        w, h = parse_image_size(args.image_size)
        if any(s.kind == "nn" or s.rule == "lrcp" or (s.codec or "").startswith(("pca", "omega")) for s in specs):
            raise UserError("nn:r, keep:lrcp:k and pca/omega codecs need --results_dir (a training run)")
        return specs, (w, h), (h // 28, w // 28), "layernorm", None, {}
    cfg, split = read_run(args.results_dir)
    model = load_run(args.results_dir).model if any(s.kind == "nn" for s in specs) else None
    bases = fit_bases(specs, LRCP_RANK, args.results_dir, cfg.cache_dir, split["train"], cfg.normalization)
    size, hw = cache_image_size(cfg.cache_dir), cache_grid(cfg.cache_dir)
    return specs, size, hw, cfg.normalization, model, bases


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        from lmms_eval.evaluator import simple_evaluate
        from lmms_eval.tasks import TaskManager
        from lmms_eval.utils import make_table
    except ImportError as e:
        raise UserError(f"lmms-eval's evaluator does not import ({e}): {INSTALL}") from None
    specs, size, hw, norm, nn_model, bases = run_setup(args)
    tasks = [t for t in (args.tasks or (LOCAL_TASK if args.parquet_dir else "")).split(",") if t]
    if not tasks:
        raise UserError("give --tasks (lmms-eval task names) or --parquet_dir (a local TextVQA-schema parquet)")
    dev = torch.device(args.device)
    lm = LowRankQwen(
        args.model,
        str(specs[0]),
        dev,
        getattr(torch, args.dtype or default_dtype(dev)),
        size,
        hw,
        norm,
        nn_model,
        bases,
        args.max_new_tokens,
        args.seed,
        args.batch_size or default_batch_size(dev),
    )
    out, report = Path(args.out_dir), {}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as inc:
        if args.parquet_dir:
            local_task(args.parquet_dir, Path(inc))
        manager = TaskManager(include_path=[inc] + ([args.include_path] if args.include_path else []))
        for spec in specs:
            lm.spec = spec
            res = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=args.limit, log_samples=True)
            print(f"== transform {spec}: lmms-eval's table ==\n{make_table(res)}")
            answers = {t: [s["filtered_resps"][0] for s in res["samples"][t]] for t in res["samples"]}
            report[str(spec)] = {"results": res["results"], "answers": answers}
    print(f"{'transform':<22}" + "".join(f"{t:>24}" for t in tasks))
    for name, r in report.items():
        cells = [
            next(
                (
                    f"{k.split(',')[0]} {v:.4f}"
                    for k, v in r["results"][t].items()
                    if isinstance(v, float) and "stderr" not in k
                ),
                "-",
            )
            for t in tasks
        ]
        print(f"{name:<22}" + "".join(f"{c:>24}" for c in cells))
    (out / "lmms_eval.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out / 'lmms_eval.json'}")
    return report


if __name__ == "__main__":
    run_cli(main)
