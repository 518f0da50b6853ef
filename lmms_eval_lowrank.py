"""
Any lmms-eval image task with vision-token transforms: lmms-eval's task prompts, generation settings
and scoring, unchanged; the toolkit's Qwen-VL (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) with each transform
applied where the tower's output enters the language model.

    python lmms_eval_lowrank.py --model Qwen/Qwen2.5-VL-3B-Instruct --device cuda --dtype bfloat16 \\
        --transforms original,svd:64,keep:leverage:64 --tasks textvqa_val,docvqa_val,chartqa
    python lmms_eval_lowrank.py --model tiny-random --parquet_dir demo_data --transforms original,svd:16,zeros --limit 8

--parquet_dir adds the task textvqa_local: TextVQA's lmms-eval prompt and scoring over a local
parquet in the toolkit's schema (offline). --results_dir takes a training run for nn:r, keep:lrcp:k
and codec transforms. Writes <out_dir>/lmms_eval.json: per transform, lmms-eval's results and every
answer. Needs lmms-eval:
    pip install -r requirements-lmms-deps.txt && pip install --no-deps -r requirements-lmms.txt
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from lowrank.cli import (
    HelpFormatter,
    UserError,
    add_device,
    add_dtype,
    pick_device,
    positive_int,
    run_cli,
)
from lowrank.downstream import check_conditions, default_batch_size, fit_bases
from lowrank.encoders import DEFAULT_IMAGE_SIZE, default_dtype
from lowrank.feature_cache import atomic_save, cache_grid, cache_image_size, load_manifest
from lowrank.images import Source, parse_image_size
from lowrank.lmms_model import INSTALL, LowRankQwen
from lowrank.runs import load_run, read_run
from lowrank.selection import LRCP_RANK
from lowrank.transforms import TokenSetup, check_spec, parse_spec, resize_tokens
from lowrank.vlm import model_cell

ROOT = Path(__file__).resolve().parent
LOCAL_TASK = "textvqa_local"


def get_args_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument(
        "--model",
        required=True,
        help="a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint (directory or hub id), or tiny-random, "
        "tiny-random-qwen2-vl, tiny-random-qwen3-vl / random-3b (built in code, random weights: "
        "mechanics and cost, not accuracy)",
    )
    ap.add_argument(
        "--transforms", default="original", help="comma list of transform specs (transforms.py)"
    )
    ap.add_argument(
        "--tasks",
        default=None,
        help=f"lmms-eval task names (default: {LOCAL_TASK} with --parquet_dir)",
    )
    ap.add_argument(
        "--parquet_dir",
        default=None,
        help=f"a local TextVQA-schema parquet folder: the task {LOCAL_TASK}",
    )
    ap.add_argument("--include_path", default=None, help="more lmms-eval task folders (YAML)")
    ap.add_argument(
        "--limit", type=positive_int, default=None, help="the first N documents of each task"
    )
    ap.add_argument(
        "--results_dir",
        default=None,
        help="a training run: its factoriser, bases and normalisation",
    )
    ap.add_argument(
        "--image_size",
        default=DEFAULT_IMAGE_SIZE,
        help="images are resized to this (the run's cache's)",
    )
    ap.add_argument(
        "--max_new_tokens", type=positive_int, default=16, help="when the task sets none"
    )
    ap.add_argument(
        "--batch_size",
        type=positive_int,
        default=None,
        help="documents answered together (default 32 on CUDA, 8 on CPU; 1: one at a time)",
    )
    add_device(ap)
    add_dtype(ap)
    ap.add_argument("--seed", type=int, default=0, help="the random token rule")
    ap.add_argument("--out_dir", default="lmms_results", help="where lmms_eval.json goes")
    return ap


def local_task(parquet_dir, folder):
    """The textvqa_local task over parquet_dir, written as a task YAML into folder (an lmms-eval
    include path)."""
    shutil.copy(ROOT / "lmms_tasks" / LOCAL_TASK / "utils.py", folder / "utils.py")
    yaml = (ROOT / "lmms_tasks" / LOCAL_TASK / f"{LOCAL_TASK}.yaml").read_text()
    (folder / f"{LOCAL_TASK}.yaml").write_text(
        yaml.replace("DATASET_PATH", str(Path(parquet_dir).resolve()))
    )


def run_setup(args):
    """(specs, size, token grid, normalisation, factoriser, bases): every spec checked against the
    run's model and the cache's features (or, without --results_dir, the image's token grid) before
    any model is loaded."""
    texts = [t for t in args.transforms.split(",") if t.strip()]
    if not texts:
        raise UserError("--transforms is empty: give at least one, e.g. original,svd:64")
    if not args.results_dir:
        w, h = parse_image_size(args.image_size)
        cell = model_cell(args.model)
        if w % cell or h % cell:
            raise UserError(
                f"--image_size {args.image_size}: each side must be a multiple of {args.model}'s {cell}-px cell"
            )
        hw = (h // cell, w // cell)
        specs = [parse_spec(t, hw[0] * hw[1]) for t in texts]
        if any(
            s.kind == "nn" or s.rule == "lrcp" or (s.codec or "").startswith(("pca", "omega"))
            for s in specs
        ):
            raise UserError(
                "nn:r, keep:lrcp:k and pca/omega codecs need --results_dir (a training run)"
            )
        for s in specs:  # the feature dim is the model's; the token grid bounds every rank and k
            check_spec(s, hw[0] * hw[1], hw[0] * hw[1], hw=hw)
            if s.kind == "resize":
                resize_tokens(s, (w, h), hw)
        return specs, (w, h), hw, "layernorm", None, {}
    cfg, split = read_run(args.results_dir)
    enc = load_manifest(cfg.cache_dir).encoder
    if enc.family == "vit-onnx" or enc.layer != "merger":
        raise UserError(
            f"{args.results_dir} was trained on {cfg.cache_dir} ({enc.model}, {enc.layer}): "
            f"the language model reads a Qwen vision tower's merger output"
        )
    size, hw = cache_image_size(cfg.cache_dir), cache_grid(cfg.cache_dir)
    specs = [parse_spec(t, hw[0] * hw[1]) for t in texts]
    has_nn = any(s.kind == "nn" for s in specs)
    model = load_run(args.results_dir).model if has_nn else None
    bases = fit_bases(
        specs, LRCP_RANK, args.results_dir, cfg.cache_dir, split["train"], cfg.normalization
    )
    check_conditions(specs, cfg.arch, cfg.rank if has_nn else None, hw, enc.feature_dim, bases)
    for s in specs:
        if s.kind == "resize":
            resize_tokens(s, size, hw)  # whole cells, before the model loads
    return specs, size, hw, cfg.normalization, model, bases


def check_tasks(tasks, manager, parquet_dir):
    """Every task known to lmms-eval, and a local parquet that holds rows, before the model is
    loaded."""
    if not tasks:
        raise UserError(
            "give --tasks (lmms-eval task names) or --parquet_dir (a local TextVQA-schema parquet)"
        )
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"--tasks {','.join(unknown)}: not an lmms-eval task here (see `lmms-eval --tasks list`)"
        )
    if parquet_dir:
        try:
            src = Source(parquet_dir)
        except UserError as e:
            raise UserError(
                f"--parquet_dir {parquet_dir}: no TextVQA-schema parquet rows there ({e})"
            ) from None
        if src.kind != "textvqa" or not len(src):
            raise UserError(f"--parquet_dir {parquet_dir}: no TextVQA-schema parquet rows there")


def settings_of(args, tasks):
    """What every transform's results depend on: a results file of other settings is never
    replaced."""
    keys = (
        "model",
        "results_dir",
        "image_size",
        "limit",
        "max_new_tokens",
        "seed",
        "dtype",
        "parquet_dir",
    )
    return {"tasks": tasks, **{k: str(getattr(args, k)) for k in keys}}


def open_results(path, settings):
    """The transforms already finished by a run of these settings (resumed), or refused: another
    run's file."""
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except ValueError:
        raise UserError(
            f"{path} is not readable JSON; move it away or use another --out_dir"
        ) from None
    theirs = old.get("settings") if isinstance(old, dict) else None
    if theirs != settings:
        raise UserError(
            f"{path} holds the results of a run with other settings ({theirs}); use another --out_dir"
        )
    return old.get("transforms", {})


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
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out_dir {out} is a file")
    dev = pick_device(args.device)
    dtype = getattr(torch, args.dtype or default_dtype(dev))
    settings = settings_of(args, tasks)
    report = open_results(out / "lmms_eval.json", settings)
    with tempfile.TemporaryDirectory() as inc:
        if args.parquet_dir:
            local_task(args.parquet_dir, Path(inc))
        manager = TaskManager(
            include_path=[inc] + ([args.include_path] if args.include_path else [])
        )
        check_tasks(tasks, manager, args.parquet_dir)
        todo = [s for s in specs if str(s) not in report]
        if report:
            print(
                f"{len(report)} transforms already in {out / 'lmms_eval.json'}; {len(todo)} to run"
            )
        out.mkdir(parents=True, exist_ok=True)
        lm = (
            make_model(args, specs[0], dev, dtype, (size, hw, norm, nn_model, bases))
            if todo
            else None
        )
        for spec in todo:
            lm.spec = spec
            res = simple_evaluate(
                model=lm, tasks=tasks, task_manager=manager, limit=args.limit, log_samples=True
            )
            print(f"== transform {spec}: lmms-eval's table ==\n{make_table(res)}")
            answers = {
                t: [s["filtered_resps"][0] for s in res["samples"][t]] for t in res["samples"]
            }
            report[str(spec)] = json.loads(
                json.dumps({"results": res["results"], "answers": answers}, default=str)
            )
            # each one kept
            atomic_save({"settings": settings, "transforms": report}, out / "lmms_eval.json")
    print_summary({str(s): report[str(s)] for s in specs}, tasks)
    print(f"wrote {out / 'lmms_eval.json'}")
    return {str(s): report[str(s)] for s in specs}


def make_model(args, first_spec, dev, dtype, setup):
    size, hw, norm, nn_model, bases = setup
    return LowRankQwen(
        args.model,
        transform=str(first_spec),
        device=dev,
        dtype=dtype,
        image_size=size,
        setup=TokenSetup(norm, hw, nn_model, bases),
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size or default_batch_size(dev),
    )


def print_summary(report, tasks):
    print(f"{'transform':<22}" + "".join(f"{t:>24}" for t in tasks))
    for name, r in report.items():
        cells = []
        for t in tasks:
            scores = [
                f"{k.split(',')[0]} {v:.4f}"
                for k, v in r["results"][t].items()
                if isinstance(v, float)
            ]
            cells.append(next((c for c in scores if "stderr" not in c), "-"))
        print(f"{name:<22}" + "".join(f"{c:>24}" for c in cells))


if __name__ == "__main__":
    run_cli(main)
