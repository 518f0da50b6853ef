"""
Hyperparameter search with Optuna over train_real_data.py: lr, lambda_B, lambda_ortho, weight_decay,
batch_size, arch (and rank with --tune_rank), pruning on the per-epoch validation MSE. Resumable:
the study lives in --storage.

    python tune.py --cache_dir feature_cache_real --n_trials 50 --epochs 10
    python tune.py ... --storage postgresql://user:pw@host/db     (several machines share one study)

Writes into --results_dir: split.json (shared by every trial of every study) and the journal; into
--results_dir/<study_name>/: trial_<n>/ (each trial's run), best_params.json,
optimization_history.png, param_importances.png. Several studies share one folder without touching
each other's trials. Prints the train.sh command of the best trial.
"""

import argparse
import json
import shutil
from pathlib import Path

import optuna

from lowrank.cli import (
    HelpFormatter,
    UserError,
    add_device,
    check_rank,
    name_arg,
    nonneg_int,
    parse_ints,
    positive_float,
    positive_int,
    run_cli,
)
from lowrank.config import RunConfig
from lowrank.feature_cache import NORMALIZATIONS, cached_shape
from lowrank.plots import pyplot, save
from lowrank.runs import load_or_make_split
from lowrank.training import get_args_parser as training_parser
from lowrank.training import train

TRAINING = training_parser()  # each trial's flags are training's
DEFAULTS = RunConfig()  # and their defaults the one source of these


def storage_from(spec, results_dir):
    if spec is None:
        spec = str(Path(results_dir) / "optuna_journal.log")
    if "://" in spec:  # an RDB URL (sqlite:///..., postgresql://..., mysql://...)
        return spec
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(spec))


def train_argv(p, args, trial_dir):
    argv = [
        "--cache_dir",
        args.cache_dir,
        "--results_dir",
        str(trial_dir),
        "--epochs",
        str(args.epochs),
        "--patience",
        str(args.patience),
        "--seed",
        str(args.seed),
        "--normalize",
        args.normalize,
        "--group_by",
        args.group_by,
    ]
    for k in ("lr", "lambda_B", "lambda_ortho", "weight_decay", "batch_size", "arch", "rank"):
        argv += [f"--{k}", str(p[k])]
    if args.device:
        argv += ["--device", args.device]
    if args.max_samples:
        argv += ["--max_samples", str(args.max_samples)]
    return argv


def get_args_parser():
    ap = argparse.ArgumentParser(
        description="Optuna search over the training hyperparameters.",
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--cache_dir", default=DEFAULTS.cache_dir, help="the feature cache")
    ap.add_argument(
        "--results_dir", default="results_tune", help="study folder: trials, journal, plots"
    )
    ap.add_argument(
        "--study_name",
        type=name_arg,
        default="low-rank-image",
        help="Optuna study name (resumed if it exists); also the folder of its trials under --results_dir",
    )
    ap.add_argument(
        "--storage",
        default=None,
        help="journal file path (default <results_dir>/optuna_journal.log) "
        "or an RDB URL such as postgresql://user:pw@host/db",
    )
    ap.add_argument(
        "--n_trials",
        type=positive_int,
        default=20,
        help="total trials in the study (resumed studies count those already finished)",
    )
    ap.add_argument(
        "--timeout", type=positive_float, default=None, help="seconds for this invocation"
    )
    ap.add_argument("--epochs", type=nonneg_int, default=10, help="epochs per trial")
    ap.add_argument(
        "--patience",
        type=positive_int,
        default=DEFAULTS.patience,
        help="early-stopping patience per trial",
    )
    ap.add_argument("--archs", default="symmetric,subspace", help="archs to search over")
    ap.add_argument(
        "--rank", type=int, default=DEFAULTS.rank, help="rank of every trial (without --tune_rank)"
    )
    ap.add_argument("--tune_rank", action="store_true", help="also search the rank over --ranks")
    ap.add_argument("--ranks", default="32,64,128", help="ranks searched with --tune_rank")
    ap.add_argument("--batch_sizes", default="4,8,16,32", help="batch sizes searched")
    ap.add_argument(
        "--normalize", default=DEFAULTS.normalization, choices=NORMALIZATIONS, help="as in training"
    )
    ap.add_argument("--seed", type=int, default=DEFAULTS.seed, help="split and sampler seed")
    add_device(ap)
    ap.add_argument(
        "--max_samples", type=positive_int, default=None, help="use only the first N cached samples"
    )
    ap.add_argument(
        "--group_by", default=DEFAULTS.group_by, help="split grouping, as train_real_data.py's"
    )
    ap.add_argument(
        "--resplit", action="store_true", help="replace a split.json made from other settings"
    )
    return ap


def open_study(args, out):
    """The study, created or resumed; a storage that cannot be read (a damaged journal) is named in
    one line."""
    try:
        storage = storage_from(args.storage, out)
        return optuna.create_study(
            study_name=args.study_name,
            storage=storage,
            direction="minimize",
            load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=args.seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
        )
    except Exception as e:  # optuna reports a damaged journal or database in many ways
        where = args.storage or Path(out) / "optuna_journal.log"
        raise UserError(
            f"the study storage {where} cannot be read ({type(e).__name__}: {str(e)[:200]}); move it away to start "
            f"a new study, or give another --storage"
        ) from None


def make_objective(args, out, study_dir):
    """Optuna's objective: one training per trial in <study_dir>/trial_<n>, on the folder's split;
    the best validation MSE, reported after every epoch so the pruner can stop a poor trial."""

    def objective(trial):
        p = {
            "lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
            "lambda_B": trial.suggest_float("lambda_B", 1e-6, 1e-2, log=True),
            "lambda_ortho": trial.suggest_float("lambda_ortho", 1e-5, 1e-1, log=True),
            "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-3, log=True),
            "batch_size": trial.suggest_categorical(
                "batch_size", parse_ints(args.batch_sizes, "--batch_sizes")
            ),
            "arch": trial.suggest_categorical("arch", args.archs.split(",")),
            "rank": (
                trial.suggest_categorical("rank", parse_ints(args.ranks, "--ranks"))
                if args.tune_rank
                else args.rank
            ),
        }
        trial_dir = study_dir / f"trial_{trial.number}"
        # this study's trial that died midway (numbers are unique in a study) starts again
        if trial_dir.exists():
            shutil.rmtree(trial_dir)
        trial_dir.mkdir(parents=True)
        shutil.copy(out / "split.json", trial_dir / "split.json")
        best = [float("inf")]

        def on_epoch(rec):
            best[0] = min(best[0], rec["val_mse"])
            trial.report(rec["val_mse"], rec["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(
                    f"pruned at epoch {rec['epoch']} (val MSE {rec['val_mse']:.5g})"
                )

        train(
            TRAINING.parse_args(train_argv(p, args, trial_dir)),
            on_epoch=on_epoch,
            test_at_end=False,
        )
        return best[0]

    return objective


def write_best(study, args, out, complete):
    """best_params.json -> the best trial's parameters."""
    best = study.best_trial
    p = dict(best.params)
    p.setdefault("rank", args.rank)
    (out / "best_params.json").write_text(
        json.dumps(
            {
                "trial": best.number,
                "val_mse": best.value,
                "params": p,
                "epochs": args.epochs,
                "n_complete": len(complete),
                "n_pruned": len(study.trials) - len(complete),
            },
            indent=1,
        )
    )
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)

    tokens = min(cached_shape(args.cache_dir))
    for r in parse_ints(args.ranks, "--ranks") if args.tune_rank else [args.rank]:
        check_rank(r, tokens, "--ranks" if args.tune_rank else "--rank")
    out = Path(args.results_dir)
    study_dir = out / args.study_name
    study_dir.mkdir(parents=True, exist_ok=True)
    load_or_make_split(  # one split for every trial
        out,
        args.cache_dir,
        seed=args.seed,
        max_samples=args.max_samples,
        group_by=args.group_by,
        resplit=args.resplit,
    )
    study = open_study(args, out)

    objective = make_objective(args, out, study_dir)
    done = len(
        [
            t
            for t in study.trials
            if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        ]
    )
    todo = max(0, args.n_trials - done)
    print(f"study '{args.study_name}': {done} trials done, running {todo} more")
    if todo:
        study.optimize(objective, n_trials=todo, timeout=args.timeout, catch=(UserError,))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise UserError("no trial completed")
    p = write_best(study, args, study_dir, complete)
    plots(study, study_dir)
    print(f"best trial {study.best_trial.number}: val MSE {study.best_trial.value:.6g} with {p}")
    written = ("best_params.json", "optimization_history.png", "param_importances.png")
    print("wrote " + ", ".join(str(study_dir / f) for f in written))
    print("reproduce it with:")
    print(
        f"  ./train.sh {p['batch_size']} {args.epochs} {p['lr']:.3g} {p['rank']} {p['lambda_B']:.3g} "
        f"{p['lambda_ortho']:.3g} results_best --arch {p['arch']} --weight_decay {p['weight_decay']:.3g} "
        f"--seed {args.seed} --cache_dir {args.cache_dir}"
    )
    return study


def plots(study, out, min_trials_for_importance=5):
    """optimization_history.png: each complete trial's validation MSE (log axis) and the best so
    far; param_importances.png: Optuna's fANOVA importances, or, with fewer than 5 complete trials,
    a note saying why none are drawn (importances from so few trials are noise)."""
    plt = pyplot()

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    fig, ax = plt.subplots(figsize=(8, 5))
    n, v = [t.number for t in done], [t.value for t in done]
    ax.plot(n, v, "o", label="trial (complete)")
    ax.step(
        n, [min(v[: k + 1]) for k in range(len(v))], where="post", color="C3", label="best so far"
    )
    ax.set_yscale("log")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation MSE (best epoch)")
    failed = len(study.trials) - len(done)
    ax.set_title(
        f"Optuna study '{study.study_name}': {len(done)} complete, {failed} pruned or failed"
    )
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, out / "optimization_history.png", dpi=120)
    fig = None
    if len(done) >= min_trials_for_importance:
        import warnings

        import optuna.visualization.matplotlib as vm

        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        try:
            ax = vm.plot_param_importances(study)
            fig = ax.figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
        except (RuntimeError, ValueError) as e:
            why = f"parameter importances unavailable: {e}"
    else:
        why = (
            f"{len(done)} complete trial(s): importances need at least {min_trials_for_importance} "
            f"(with fewer they are noise)"
        )
    if fig is None:
        fig, ax = plt.subplots(figsize=(8, 5))
        ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True)
        ax.axis("off")
        print(why)
    save(fig, out / "param_importances.png", dpi=120)
    plt.close("all")


if __name__ == "__main__":
    run_cli(main)
