"""
Training a low-rank factoriser X ≈ A·B on cached features: the flags (get_args_parser, the one
source of every default), the resolved config, one epoch, validation, the checkpoints and history,
and the test report. train_real_data.py runs train(args); tune.py calls it per trial with on_epoch.
"""

import argparse
import math
import random
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from lowrank import metrics
from lowrank.cli import (
    HelpFormatter,
    UserError,
    add_device,
    check_rank,
    dist_env,
    nonneg_int,
    pick_device,
)
from lowrank.config import ARCH_FLAGS, RunConfig, flag_fields
from lowrank.dataset import FeatureDataset, make_loader
from lowrank.feature_cache import (
    NORMALIZATIONS,
    atomic_save,
    cache_grid,
    cached_shape,
    folder_lock,
    lossy_note,
    remove_stale_tmp,
)
from lowrank.model import (
    ARCH_DEFAULTS,
    ARCHS,
    build_model,
    load_checkpoint,
    loss_terms,
    make_checkpoint,
    read_checkpoint,
)
from lowrank.plots import pyplot, save
from lowrank.runs import (
    BEST,
    CONFIG,
    HISTORY,
    LAST,
    SPLIT,
    load_or_make_split,
    read_history,
    read_split,
    split_fingerprint,
)
from lowrank.tail_objective import TailTarget, cut_block


def get_args_parser():
    ap = argparse.ArgumentParser(
        description="Train a low-rank factoriser X ≈ A·B on cached Qwen vision features.",
        formatter_class=HelpFormatter,
    )
    choices = {"arch": list(ARCHS), "normalize": list(NORMALIZATIONS)}
    for name, f in flag_fields():  # what the run is: RunConfig holds the defaults and help
        ap.add_argument(
            f"--{name}",
            type=f.metadata["type"],
            default=None,
            choices=choices.get(name),
            help=f"{f.metadata['help']} (default: {f.default})",
        )
    for name, (arch, help, type_) in ARCH_FLAGS.items():
        default = ARCH_DEFAULTS[arch].get(
            name, 0 if name == "out_map" else "per rank, from the schedule"
        )
        ap.add_argument(
            f"--{name}", type=type_, default=None, help=f"{arch} only: {help} (default: {default})"
        )
    # how to run, not what the run is: free to differ on --resume
    ap.add_argument(
        "--results_dir", default="results", help="where checkpoints, split.json and logs go"
    )
    add_device(ap)
    ap.add_argument("--num_workers", type=nonneg_int, default=0, help="DataLoader worker processes")
    ap.add_argument("--resume", action="store_true", help="continue from results_dir/last.pt")
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="train into a --results_dir that holds a trained run, replacing it (refused otherwise)",
    )
    ap.add_argument(
        "--amp",
        action="store_true",
        help="bf16 autocast (CUDA, or CPU); QR and the loss stay float32",
    )
    ap.add_argument(
        "--preload",
        default="auto",
        choices=["auto", "yes", "no"],
        help="hold the train and validation features in RAM as float32 (auto: when they take under a "
        "quarter of the machine's RAM), or read them from the cache every epoch",
    )
    ap.add_argument(
        "--resplit",
        action="store_true",
        help="replace a split.json made with another seed, sample count, cache or grouping (its test set changes)",
    )
    return ap


# --------------------------------------------------------------------------------------------------
# set-up


def given_settings(args):
    """({RunConfig field: value}, {arch option: value}) of the flags given on the command line.
    Every such flag's parser default is None, so a flag counts as given whenever it is given,
    whatever its value."""
    given = {
        f.name: getattr(args, name)
        for name, f in flag_fields()
        if getattr(args, name, None) is not None
    }
    options = {k: getattr(args, k) for k in ARCH_FLAGS if getattr(args, k, None) is not None}
    return given, options


def new_config(given, options, world):
    """The config of a new run, stored resolved (arch defaults filled in): the run folder says how
    it was made even if a default changes later. An option of another arch is refused, not
    dropped."""
    config = RunConfig(**given)
    wrong = [k for k in options if ARCH_FLAGS[k][0] != config.arch]
    if wrong:
        arch = ARCH_FLAGS[wrong[0]][0]
        raise UserError(
            f"--{wrong[0]} is an option of --arch {arch}, and this run's arch is {config.arch}: drop it, or give "
            f"--arch {arch}"
        )
    defaults = dict(ARCH_DEFAULTS[config.arch])
    # one setting for every rank instead of the per-rank schedule
    if options and config.arch == "subspace":
        defaults.pop("schedule")
    return replace(
        config,
        cache_dir=str(Path(config.cache_dir).resolve()),
        world_size=world,
        arch_options={**defaults, **options},
    )


def resolve_config(args, world):
    """-> (config, resume checkpoint or None). A resumed run takes the checkpoint's config; a
    setting given on the command line (whatever its value) that differs from the run's is refused,
    except --epochs and --patience."""
    given, options = given_settings(args)
    if not args.resume:
        return new_config(given, options, world), None
    out = Path(args.results_dir)
    if not (out / LAST).exists():
        raise UserError(f"--resume: {out / LAST} not found")
    ck = read_checkpoint(out / LAST)
    config = RunConfig.from_dict(ck.config, f"{out / LAST}'s config")
    if config.compressed or "optimizer" not in ck.extra:
        raise UserError(
            f"--resume: {out / LAST} is not a training state (a compressed or model-only checkpoint)"
        )
    changed = []
    for name, f in flag_fields():
        if f.name in given and not f.metadata["resumable"]:
            value = str(Path(given[f.name]).resolve()) if f.name == "cache_dir" else given[f.name]
            if value != getattr(config, f.name):
                changed.append(f"--{name} {given[f.name]} (the run has {getattr(config, f.name)})")
    for k, v in options.items():
        if config.arch_options.get(k) != v:
            changed.append(
                f"--{k} {v} (the run has {config.arch_options.get(k, 'the per-rank schedule')})"
            )
    if changed:
        raise UserError(
            f"--resume continues the run in {out} as it was made; these flags differ: "
            + "; ".join(changed)
            + ". Drop them, or start a new run (another --results_dir)"
        )
    return replace(config, **{k: given[k] for k in ("epochs", "patience") if k in given}), ck


def add_shape(config, out, resumed):
    """-> the config with the cache's feature shape and grid (the manifest is the one source of the
    shape), checked against a resumed run's and against the rank."""
    tokens, dim = cached_shape(config.cache_dir)
    if resumed and config.shape != (tokens, dim):
        raise UserError(
            f"--resume: {out / LAST} was trained on [{config.tokens}, {config.dim}] features; "
            f"{config.cache_dir} holds [{tokens}, {dim}]"
        )
    check_rank(config.rank, min(tokens, dim))
    return replace(config, tokens=tokens, dim=dim, grid=tuple(cache_grid(config.cache_dir)))


def load_data(config, split, args, rank_id, world):
    """Train and validation datasets and loaders. Every sample of all three splits is checked before
    epoch 1: preloaded data was read and checked in full, a lazily read train split gets header
    checks (its values are checked as each file is read), validation and test are read in full (they
    are small)."""
    preload = {"auto": "auto", "yes": True, "no": False}[args.preload]
    cache, norm = config.cache_dir, config.normalization
    train_ds = FeatureDataset(cache, split["train"], norm, preload)
    val_ds = FeatureDataset(cache, split["val"], norm, preload)
    train_ds.verify(full=False)
    val_ds.verify(full=True)
    FeatureDataset(cache, split["test"], norm, preload=False).verify(full=True)
    sampler = torch.utils.data.DistributedSampler(
        train_ds, num_replicas=world, rank=rank_id, shuffle=True, seed=config.seed
    )
    train_loader = make_loader(
        train_ds, config.batch_size, sampler=sampler, num_workers=args.num_workers
    )
    val_loader = make_loader(val_ds, 64, num_workers=args.num_workers)
    return train_ds, val_ds, train_loader, val_loader, sampler


def describe_data(log, config, split, datasets, *, device, world, preload):
    train_ds, val_ds = datasets
    gib = len(train_ds) * train_ds.shape[0] * train_ds.shape[1] * 4 / 2**30

    def where(ds):
        return "in RAM" if ds.data is not None else "read lazily"

    log(
        f"{len(train_ds)} train / {len(val_ds)} val / {len(split['test'])} test samples from {config.cache_dir}"
        f" ({config.normalization}); arch {config.arch} rank {config.rank} on {device}"
        f"{f' x {world} processes' if world > 1 else ''}{lossy_note(config.cache_dir)}"
    )
    log(
        f"features: train {gib:.2f} GiB as float32 {where(train_ds)}, validation {where(val_ds)} (--preload {preload})"
    )
    log(
        f"split grouped by {split.get('grouped_by', 'none')}: identical images shared between splits "
        f"{split.get('shared_images', '?')}, image_id values (source photos) shared "
        f"{split.get('shared_image_ids', '?')}"
        + (
            f", {split['grouped_by']} values shared {split['shared_groups']}"
            if "shared_groups" in split
            else ""
        )
    )


class State:
    """What an epoch changes and a checkpoint restores: optimiser, scheduler, history, best
    validation MSE."""

    def __init__(self, model, config):
        # an output gain (--out_map, entries ~1) steps at 10x the rate of Ω's (entries ~1/sqrt(D))
        gain = [p for n, p in model.named_parameters() if n == "out_map"]
        rest = [p for n, p in model.named_parameters() if n != "out_map"]
        groups = [{"params": rest}] + ([{"params": gain, "lr": 10 * config.lr}] if gain else [])
        self.opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.opt, mode="min", factor=0.5, patience=3
        )
        self.history, self.start_epoch, self.best, self.bad_epochs = [], 1, math.inf, 0

    def restore(self, ck, out):
        self.opt.load_state_dict(ck.extra["optimizer"])
        self.sched.load_state_dict(ck.extra["scheduler"])
        self.history, self.start_epoch = read_history(out), ck.epoch + 1
        self.best, self.bad_epochs = ck.best_val_mse, ck.extra["bad_epochs"]
        torch.set_rng_state(ck.extra["rng_cpu"])

    def update(self, rec):
        """Record an epoch -> whether it improved on the best validation score (MSE; with a tail
        objective, the validation objective)."""
        score = rec[selection_key(rec)]
        self.sched.step(score)
        improved = score < self.best
        self.best, self.bad_epochs = (score, 0) if improved else (self.best, self.bad_epochs + 1)
        self.history.append(rec)
        return improved

    def save(self, model, config, epoch, improved, out):
        """best_model.pt (when improved), last.pt (with the optimiser), history.json and the loss
        curves."""
        extra = {"bad_epochs": self.bad_epochs, "rng_cpu": torch.get_rng_state()}
        if improved:
            atomic_save(
                make_checkpoint(model, config.to_dict(), epoch, self.best, extra=extra), out / BEST
            )
        atomic_save(
            make_checkpoint(
                model,
                config.to_dict(),
                epoch,
                self.best,
                optimizer=self.opt,
                scheduler=self.sched,
                extra=extra,
            ),
            out / LAST,
        )
        atomic_save(self.history, out / HISTORY)
        plot_history(
            self.history,
            out / "loss_curves.png",
            f"{config.arch}, rank {config.rank}, {config.normalization} - {out}",
        )


# --------------------------------------------------------------------------------------------------
# one epoch, validation


def all_agree(flag, world):
    """True on every rank if flag is True on any rank (early stop, non-finite loss): no rank
    hangs."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def selection_key(rec):
    """The validation score the best epoch minimises: the objective where it includes the
    network's tail (val_tail_objective), else the reconstruction MSE."""
    return "val_tail_objective" if "val_tail_objective" in rec else "val_mse"


def recon_objective(raw_model, X, A, B, terms):
    """The reconstruction part of what the optimiser minimises: a subspace model's energy outside
    its nested prefixes (exact only while A's columns and B's rows are orthogonal, so not with an
    output map, whose B diag(g) the energy shortcut would reward for growing); else the loss terms' total
    (for a subspace model with an output map, the MSE alone: its B rows are not meant to be
    orthonormal)."""
    if hasattr(raw_model, "objective") and getattr(raw_model, "out_map", None) is None:
        return raw_model.objective(X, A, B)
    return terms["recon"] if hasattr(raw_model, "objective") else terms["total"]


@dataclass
class Loop:
    """What every epoch uses: the model (DDP-wrapped under torchrun) and the model itself, the
    optimiser, the config, where it runs (device, autocast, processes), the truncated SVD's
    validation figures (rank 0) and the (train, validation) TailTarget of a --tail_weight run."""

    model: torch.nn.Module
    raw_model: torch.nn.Module
    opt: torch.optim.Optimizer
    config: RunConfig
    device: torch.device
    amp: object
    world: int
    svd_val: dict | None = None
    tails: tuple = (None, None)


def train_one_epoch(loop, loader, desc):
    """One pass over the training split -> the mean of each loss term, or None when the loss became
    non-finite (on any rank). Subspace models train on their own objective (the energy outside the
    nested prefixes); a tail objective adds config.tail_weight x its downstream loss."""
    model, raw_model, opt, config = loop.model, loop.raw_model, loop.opt, loop.config
    device, amp, world, tail = loop.device, loop.amp, loop.world, loop.tails[0]
    model.train()
    sums, n, nonfinite = {}, 0, False
    for X, idx in tqdm(loader, desc=desc, leave=False, disable=desc is None):
        X = X.to(device, non_blocking=True)
        with amp:
            Xhat, A, B = model(X)
            Xhat, A, B = Xhat.float(), A.float(), B.float()
            terms = loss_terms(X, Xhat, A, B, config.lambda_B, config.lambda_ortho)
            loss = recon_objective(raw_model, X, A, B, terms)
            if tail is not None:
                terms["tail"] = tail.loss(Xhat, idx)
                loss = loss + config.tail_weight * terms["tail"]
        terms["objective"] = loss.detach()  # what the optimiser minimises
        nonfinite = nonfinite or not torch.isfinite(loss)
        if all_agree(nonfinite, world):
            return None
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config.grad_clip)
        opt.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.item() * len(X)
        n += len(X)
    if world > 1:  # average the train terms over ranks
        t = torch.tensor([sums[k] for k in sorted(sums)] + [n], dtype=torch.float64)
        dist.all_reduce(t)
        sums, n = dict(zip(sorted(sums), t[:-1].tolist())), t[-1].item()
    return {f"train_{k}": v / n for k, v in sums.items()}


def validate(loop, loader, epoch, t0, train_terms):
    """Validation metrics (and the tail objective's, with one) -> the history record of this
    epoch."""
    model, device, svd_val = loop.raw_model, loop.device, loop.svd_val
    lr = loop.opt.param_groups[0]["lr"]
    val = metrics.summarize(
        metrics.evaluate(lambda X: model(X)[0].float(), loader, device, "val")[0]
    )
    rec = {
        "epoch": epoch,
        **train_terms,
        **{f"val_{k}": val[k]["mean"] for k in metrics.METRICS},
        "lr": lr,
        "seconds": time.time() - t0,
    }
    if svd_val:
        rec.update({f"svd_val_{k}": svd_val[k]["mean"] for k in ("mse", "cosine", "energy")})
    rec.update(val_tail(model, loader, loop.tails[1], loop.config, device))
    return rec


def tail_targets(config, split, device, log):
    """(train, validation) TailTarget of a --tail_weight run: the unmodified network's output on
    each crop, computed once."""
    t0 = time.time()
    targets = tuple(
        TailTarget(config.cache_dir, split[part], config.normalization, device)
        for part in ("train", "val")
    )
    log(
        f"tail objective: the ViT after block {targets[0].block} on {len(split['train'])} train and "
        f"{len(split['val'])} validation crops, weight {config.tail_weight} "
        f"({time.time() - t0:.0f} s to compute the unmodified network's output)"
    )
    return targets


@torch.no_grad()
def val_tail(model, loader, tail, config, device):
    """{'val_tail': the downstream loss, 'val_tail_objective': the validation objective (energy
    outside or MSE, plus tail_weight x it)} over the validation split; {} without a tail."""
    if tail is None:
        return {}
    sums, n = {"tail": 0.0, "objective": 0.0}, 0
    for X, idx in loader:
        X = X.to(device)
        Xhat, A, B = (t.float() for t in model(X))
        terms = loss_terms(X, Xhat, A, B, config.lambda_B, config.lambda_ortho)
        base = recon_objective(model, X, A, B, terms)
        t = tail.loss(Xhat, idx)
        sums["tail"] += t.item() * len(X)
        sums["objective"] += (base + config.tail_weight * t).item() * len(X)
        n += len(X)
    return {"val_tail": sums["tail"] / n, "val_tail_objective": sums["objective"] / n}


def arch_terms(arch, rec):
    """The train terms that mean something for the arch: subspace optimises its own objective (the
    energy left outside the nested prefixes), so its B-regulariser and orthogonality terms are not
    shown."""
    if arch == "subspace":
        return f"train objective {rec['train_objective']:.5f} (mse {rec['train_recon']:.5f})"
    return (
        f"train loss {rec['train_objective']:.5f} (mse {rec['train_recon']:.5f} b_reg {rec['train_b_reg']:.3g} "
        f"ortho {rec['train_ortho']:.3g})"
    )


def epoch_line(epoch, config, rec, improved):
    head = "start point" if epoch == 0 else arch_terms(config.arch, rec)
    tail = (
        ""
        if epoch == 0
        else f" | lr {rec['lr']:.2g} | {rec['seconds']:.1f}s{' *' if improved else ''}"
    )
    downstream = f" tail {rec['val_tail']:.4f}" if "val_tail" in rec else ""
    return (
        f"epoch {epoch:3d} | {head} | val mse {rec['val_mse']:.5f} cos {rec['val_cosine']:.4f} energy "
        f"{rec['val_energy']:.4f}{downstream}{tail}"
    )


# --------------------------------------------------------------------------------------------------
# the run


def train(args, on_epoch=None, test_at_end=True):
    """Train as args say (a Namespace of get_args_parser()); on_epoch(record) is called after each
    epoch (tune.py prunes from it). Returns the test report (None without test_at_end). The run
    folder has one owner: rank 0 holds its lock for the life of the run, and a folder that holds a
    trained run is refused without --resume or --overwrite."""
    proc = dist_env()
    out = Path(args.results_dir)
    config, ck = resolve_config(args, proc.world)
    config = add_shape(config, out, resumed=ck is not None)
    if config.tail_weight:
        cut_block(config.cache_dir)  # refused before the run folder is touched
    with ExitStack() as stack:
        if proc.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            stack.enter_context(folder_lock(out, wait=0, what="training: " + " ".join(sys.argv)))
            check_fresh(out, args)
            config = write_run_folder(out, config, resplit=args.resplit and not args.resume)
        if proc.world > 1:
            dist.barrier()
        return fit(args, config, ck, proc, on_epoch=on_epoch, test_at_end=test_at_end)


def check_fresh(out, args):
    """Refuse to train over a trained run unless asked: --resume continues it, --overwrite replaces
    it."""
    if args.resume and args.overwrite:
        raise UserError(
            "--resume continues the run in --results_dir, --overwrite replaces it: give one of them"
        )
    done = [f for f in (BEST, LAST) if (out / f).exists()]
    if done and not args.resume and not args.overwrite:
        raise UserError(
            f"{out} holds a trained run ({', '.join(done)}); --resume continues it, --overwrite "
            f"replaces it, or use another --results_dir"
        )


def quiet(*args, **kwargs):
    """The log of a process other than rank 0."""


def fit(args, config, ck, proc, *, on_epoch, test_at_end):
    """Data, model, epoch 0, the epochs, the test report; proc: this process (cli.Dist)."""
    rank_id, world, local_rank = proc
    master = rank_id == 0
    log = print if master else quiet
    device = pick_device(args.device, local_rank)
    out = Path(args.results_dir)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    split = read_split(out)
    train_ds, val_ds, train_loader, val_loader, sampler = load_data(
        config, split, args, rank_id, world
    )
    describe_data(
        log, config, split, (train_ds, val_ds), device=device, world=world, preload=args.preload
    )
    raw_model, model = make_model(config, ck, train_ds, device, world, local_rank)
    state = State(raw_model, config)
    if ck is not None:
        state.restore(ck, out)
        log(f"resumed from {out / LAST} at epoch {ck.epoch} (best val MSE {state.best:.6g})")
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else nullcontext()
    loop = Loop(model, raw_model, state.opt, config, device, amp, world)
    loop.svd_val = svd_target(config, val_loader, device, log) if master else None
    if config.tail_weight:
        loop.tails = tail_targets(config, split, device, log)
    # epoch 0: the starting point (for subspace, the principal directions) is a candidate
    if ck is None:
        rec = validate(loop, val_loader, 0, time.time(), {})
        state.best = rec[selection_key(rec)]
        state.history.append(rec)
        if master:
            state.save(raw_model, config, 0, True, out)
        log(epoch_line(0, config, rec, True))
    stopped = "completed"
    for epoch in range(state.start_epoch, config.epochs + 1):
        t0 = time.time()
        sampler.set_epoch(epoch)
        desc = f"epoch {epoch}/{config.epochs}" if master else None
        terms = train_one_epoch(loop, train_loader, desc)
        if terms is None:
            stopped = "non-finite loss"
            log(nonfinite_message(epoch, out))
            break
        rec = validate(loop, val_loader, epoch, t0, terms)
        improved = state.update(rec)
        if master:
            state.save(raw_model, config, epoch, improved, out)
        log(epoch_line(epoch, config, rec, improved))
        if on_epoch is not None:
            on_epoch(rec)
        if state.bad_epochs >= config.patience:
            stopped = f"early stop: no better validation score for {config.patience} epochs"
            log(stopped)
            break
    if world > 1:
        dist.barrier()

    warn_if_no_progress(state.history, log)
    result = None
    if master and test_at_end and (out / BEST).exists():
        result = dict(test_report(out / BEST, split["test"], device), stopped=stopped)
    if world > 1:
        dist.destroy_process_group()
    if stopped == "non-finite loss":
        raise SystemExit(2)
    return result


def write_run_folder(out, config, resplit):
    """The run folder's split.json (made, or checked against this run's settings) and config.json ->
    the config with the split's fingerprint: a checkpoint is never scored on a split it was not
    trained with."""
    remove_stale_tmp(out)
    split = load_or_make_split(
        out,
        config.cache_dir,
        seed=config.seed,
        max_samples=config.max_samples,
        group_by=config.group_by,
        resplit=resplit,
        test_share=config.test_share,
    )
    if config.split_sha not in (None, split_fingerprint(split)):
        raise UserError(f"--resume: {out / SPLIT} is not the split this run was trained on")
    config = replace(config, split_sha=split_fingerprint(split))
    atomic_save(config.to_dict(), out / CONFIG)
    return config


def make_model(config, ck, train_ds, device, world, local_rank):
    """-> (the model, the model that trains: DDP-wrapped under torchrun). Started from the
    checkpoint when resuming, else (subspace) from the training tokens' principal directions."""
    model = build_model(config).to(device)
    if ck is not None:
        model.load_state_dict(ck.model)
    elif hasattr(model, "init_from_data"):
        model.init_from_data(X for X, _ in make_loader(train_ds, 64))
    if world > 1:
        ids = [local_rank] if device.type == "cuda" else None
        return model, torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model, model


def svd_target(config, val_loader, device, log):
    """The target: truncated SVD at the same rank on the validation samples."""
    rank = config.rank
    per, _, _ = metrics.evaluate(
        lambda X: metrics.svd_reconstruct(X, rank), val_loader, device, "svd val"
    )
    svd_val = metrics.summarize(per)
    log(
        f"truncated SVD on validation: {metrics.format_summary(svd_val, ('mse', 'cosine', 'energy'))}"
    )
    return svd_val


def nonfinite_message(epoch, out):
    kept = [str(out / f) for f in (BEST, LAST) if (out / f).exists()]
    return (
        f"epoch {epoch}: the loss became NaN/Inf; stopping. "
        + (
            f"The last good checkpoints ({', '.join(kept)}) are kept. "
            if kept
            else "No checkpoint was written. "
        )
        + "Lower --lr (the cache's files were checked and are finite)."
    )


def warn_if_no_progress(history, log):
    scored = [h for h in history if "val_mse" in h]
    if not scored:
        return
    key = selection_key(scored[0])
    best_epoch = min(scored, key=lambda h: h[key])["epoch"]
    what = "objective" if key == "val_tail_objective" else "MSE"
    if best_epoch == 0 and len(history) > 1:
        log(
            f"warning: no epoch improved on the starting point (epoch 0, val {what} {history[0][key]:.6g}): "
            f"training made the model worse, so best_model.pt holds the starting point. Try a lower --lr."
        )


def test_report(ckpt_path, test_idx, device):
    """Best model vs truncated SVD at the same rank on the same test samples, same normalisation."""
    model, ck = load_checkpoint(ckpt_path, device)
    cfg = RunConfig.from_dict(ck.config)
    loader = make_loader(FeatureDataset(cfg.cache_dir, test_idx, cfg.normalization), 64)
    nn_per, _, _ = metrics.evaluate(lambda X: model(X)[0].float(), loader, device, "test NN")
    svd_per, _, _ = metrics.evaluate(
        lambda X: metrics.svd_reconstruct(X, cfg.rank), loader, device, "test SVD"
    )
    nn_s, svd_s = metrics.summarize(nn_per), metrics.summarize(svd_per)
    keys = ("cosine", "energy", "mse", "rel_fro")
    print(f"test (n={len(test_idx)}, best epoch {ck.epoch}, rank {cfg.rank}, {cfg.normalization}):")
    print(f"  {cfg.arch:>10}: {metrics.format_summary(nn_s, keys)}")
    print(f"  {'SVD':>10}: {metrics.format_summary(svd_s, keys)}")
    return {"nn": nn_s, "svd": svd_s, "best_epoch": ck.epoch}


def plot_history(history, path, title=""):
    """Loss, validation cosine and learning rate per epoch (epoch 0 = the starting point, validation
    only)."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    tr = [h for h in history if "train_recon" in h]
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8), dpi=120)
    if tr:
        ax[0].plot(
            [h["epoch"] for h in tr], [h["train_recon"] for h in tr], "o-", label="train MSE"
        )
        if any(h["train_objective"] != h["train_recon"] for h in tr):
            ax[0].plot(
                [h["epoch"] for h in tr],
                [h["train_objective"] for h in tr],
                "--",
                label="train objective",
            )
    ax[0].plot(ep, [h["val_mse"] for h in history], "o-", label="validation MSE")
    ax[0].set_yscale("log")
    ax[0].set_title("loss")
    ax[0].legend()
    ax[1].plot(ep, [h["val_cosine"] for h in history], "o-", color="C2", label="NN")
    if history and "svd_val_cosine" in history[0]:
        ax[1].axhline(history[0]["svd_val_cosine"], color="k", ls="--", label="truncated SVD")
    ax[1].set_title("validation cosine")
    ax[1].legend()
    ax[2].plot(ep, [h["lr"] for h in history], "o-", color="C3")
    if all(h["lr"] > 0 for h in history):
        ax[2].set_yscale("log")
    ax[2].set_title("learning rate")
    for a in ax:
        a.set_xlabel("epoch (0 = starting point)")
        a.grid(alpha=0.3)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    save(fig, path)
