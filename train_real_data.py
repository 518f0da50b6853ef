"""
Train a low-rank factoriser X ≈ A·B on cached Qwen2.5-VL vision features.

    python train_real_data.py --batch_size 8 --epochs 20 --lr 0.001 --rank 128 --cache_dir feature_cache_real
    torchrun --nproc_per_node=4 train_real_data.py ...      (DDP; rank 0 logs and writes)

Writes into --results_dir: best_model.pt, last.pt, split.json, config.json, history.json, loss_curves.png.
"""
import argparse
import json
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import qwenvl_dataloader as qd
import svd_baseline as sb
from model import ARCH_DEFAULTS, ARCHS, build_model, load_checkpoint, loss_terms, make_checkpoint, read_checkpoint


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="Train a low-rank factoriser X ≈ A·B on cached Qwen vision features.",
                                 formatter_class=qd.HelpFormatter)
    ap.add_argument("--batch_size", type=int, default=8, help="training batch size (per process under torchrun)")
    ap.add_argument("--epochs", type=int, default=20, help="training epochs (epoch 0 = the starting point)")
    ap.add_argument("--lr", type=float, default=0.001, help="AdamW learning rate")
    ap.add_argument("--rank", type=int, default=128, help="rank r of the factorisation, 1..min(tokens, dim)")
    ap.add_argument("--lambda_B", type=float, default=0.0001, help="weight of mean(B²)")
    ap.add_argument("--lambda_ortho", type=float, default=0.001, help="weight of ‖BBᵀ - I‖²_F / r²")
    ap.add_argument("--weight_decay", type=float, default=0.00001, help="AdamW weight decay")
    ap.add_argument("--patience", type=int, default=10, help="early stop after this many epochs without a better "
                                                            "validation MSE")
    ap.add_argument("--results_dir", default="results", help="where checkpoints, split.json and logs go")
    ap.add_argument("--seed", type=int, default=42, help="split, initialisation and shuffling")
    ap.add_argument("--arch", default="symmetric", choices=list(ARCHS),
                    help="symmetric: the original's MLP network; subspace: learned subspace iteration")
    ap.add_argument("--cache_dir", default="feature_cache_real", help="the feature cache (qwenvl_dataloader.py)")
    ap.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available)")
    ap.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    ap.add_argument("--normalize", default="layernorm", choices=qd.NORMALIZATIONS,
                    help="layer norm over the feature dims (no affine), or none; stored in the checkpoint")
    ap.add_argument("--resume", action="store_true", help="continue from results_dir/last.pt")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA, or CPU); QR and the loss stay float32")
    ap.add_argument("--max_samples", type=int, default=None, help="use only the first N cached samples")
    ap.add_argument("--preload", default="auto", choices=["auto", "yes", "no"],
                    help="hold the train and validation features in RAM as float32 (auto: when they take under a "
                         "quarter of the machine's RAM), or read them from the cache every epoch")
    ap.add_argument("--group_by", default=qd.GROUP_AUTO,
                    help="keep samples with the same value of this manifest field in one split: image_id (the "
                         "source photo/image), fingerprint (identical image bytes), none; auto = image_id where the "
                         "source has it, else fingerprint")
    ap.add_argument("--resplit", action="store_true", help="replace a split.json made with another seed, sample "
                                                           "count, cache or grouping (its test set changes)")
    ap.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clipping")
    ap.add_argument("--hidden", type=int, default=None, help="symmetric: MLP hidden width (default 512)")
    ap.add_argument("--power_iters", type=int, default=None, help="subspace: power steps Q = orth(X Xᵀ Q) per sample (default 1: chosen on the hard benchmark)")
    ap.add_argument("--oversample", type=int, default=None, help="subspace: extra columns in Ω (default 0: nested ranks without an eigendecomposition)")
    return ap.parse_args(argv)


class NonFinite(Exception):
    pass


def all_agree(flag, world):
    """True on every rank if flag is True on any rank (early stop, non-finite loss): no rank hangs."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def plot_history(history, path, title=""):
    """Loss, validation cosine and learning rate per epoch (epoch 0 = the starting point, validation only)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    tr = [h for h in history if "train_recon" in h]
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8), dpi=120)
    if tr:
        ax[0].plot([h["epoch"] for h in tr], [h["train_recon"] for h in tr], "o-", label="train MSE")
        if any(h["train_objective"] != h["train_recon"] for h in tr):
            ax[0].plot([h["epoch"] for h in tr], [h["train_objective"] for h in tr], "--", label="train objective")
    ax[0].plot(ep, [h["val_mse"] for h in history], "o-", label="validation MSE")
    ax[0].set_yscale("log"), ax[0].set_title("loss"), ax[0].legend()
    ax[1].plot(ep, [h["val_cosine"] for h in history], "o-", color="C2", label="NN")
    if history and "svd_val_cosine" in history[0]:
        ax[1].axhline(history[0]["svd_val_cosine"], color="k", ls="--", label="truncated SVD")
    ax[1].set_title("validation cosine"), ax[1].legend()
    ax[2].plot(ep, [h["lr"] for h in history], "o-", color="C3")
    if all(h["lr"] > 0 for h in history):
        ax[2].set_yscale("log")
    ax[2].set_title("learning rate")
    for a in ax:
        a.set_xlabel("epoch (0 = starting point)"), a.grid(alpha=0.3)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None, on_epoch=None, test_at_end=True):
    """Train; on_epoch(record) is called after each epoch (tune.py prunes from it). Returns the test report."""
    args = get_args(argv)
    rank_id, world, local_rank = qd.dist_env()
    master = rank_id == 0
    log = print if master else (lambda *a, **k: None)
    device = torch.device(args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    out = Path(args.results_dir)

    ck = None
    if args.resume:
        if not (out / "last.pt").exists():
            raise qd.UserError(f"--resume: {out / 'last.pt'} not found")
        ck = read_checkpoint(out / "last.pt")
        config = ck["config"]
        if (config["rank"], config["arch"]) != (args.rank, args.arch):
            log(f"--resume: using the checkpoint's arch {config['arch']} and rank {config['rank']}")
        config["epochs"], config["patience"] = args.epochs, args.patience  # a resumed run may be extended
    else:
        opts = {k: getattr(args, k) for k in ("hidden", "power_iters", "oversample") if getattr(args, k) is not None}
        opts = {k: opts.get(k, v) for k, v in ARCH_DEFAULTS[args.arch].items()}  # stored resolved: defaults may change
        config = {"arch": args.arch, "rank": args.rank, "arch_options": opts, "normalization": args.normalize,
                  "cache_dir": str(Path(args.cache_dir).resolve()), "batch_size": args.batch_size, "epochs": args.epochs,
                  "lr": args.lr, "lambda_B": args.lambda_B, "lambda_ortho": args.lambda_ortho,
                  "weight_decay": args.weight_decay, "patience": args.patience, "seed": args.seed,
                  "grad_clip": args.grad_clip, "max_samples": args.max_samples, "world_size": world,
                  "group_by": args.group_by}
    torch.manual_seed(config["seed"]), random.seed(config["seed"]), np.random.seed(config["seed"])
    tokens, dim = qd.cached_shape(config["cache_dir"])  # the manifest is the one source of the shape
    if "tokens" in config and (config["tokens"], config["dim"]) != (tokens, dim):
        raise qd.UserError(f"--resume: {out / 'last.pt'} was trained on [{config['tokens']}, {config['dim']}] "
                           f"features; {config['cache_dir']} holds [{tokens}, {dim}]")
    config.update(tokens=tokens, dim=dim, grid=list(qd.cache_grid(config["cache_dir"])))
    qd.check_rank(config["rank"], min(tokens, dim))

    if master:
        if out.exists():
            qd.remove_stale_tmp(out)
        split = qd.load_or_make_split(out, config["cache_dir"], config["seed"], config["max_samples"],
                                      config.get("group_by", qd.GROUP_AUTO), args.resplit and not args.resume)
        (out / "config.json").write_text(json.dumps(config, indent=1))
    if world > 1:
        dist.barrier()
    split = json.loads((out / "split.json").read_text())
    norm = config["normalization"]
    # every sample of all three splits is checked before epoch 1: preloaded data was read and checked in full, a
    # lazily read train split gets header checks (shape, dtype; its values are checked as each file is read),
    # validation and test are read in full (they are small); a bad file is named now, not after the last epoch
    preload = {"auto": "auto", "yes": True, "no": False}[args.preload]
    train_ds = qd.FeatureDataset(config["cache_dir"], split["train"], norm, preload)
    val_ds = qd.FeatureDataset(config["cache_dir"], split["val"], norm, preload)
    for ds, full in ((train_ds, False), (val_ds, True)):
        ds.verify(full)
    qd.FeatureDataset(config["cache_dir"], split["test"], norm, preload=False).verify(full=True)
    sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=world, rank=rank_id, shuffle=True,
                                                  seed=config["seed"])
    train_loader = qd.make_loader(train_ds, config["batch_size"], sampler=sampler, num_workers=args.num_workers)
    val_loader = qd.make_loader(val_ds, 64, num_workers=args.num_workers)
    log(f"{len(train_ds)} train / {len(val_ds)} val / {len(split['test'])} test samples from {config['cache_dir']}"
        f" ({norm}); arch {config['arch']} rank {config['rank']} on {device}"
        f"{f' x {world} processes' if world > 1 else ''}{qd.lossy_note(config['cache_dir'])}")
    gib = lambda ds: len(ds) * ds.shape[0] * ds.shape[1] * 4 / 2 ** 30
    log(f"features: train {gib(train_ds):.2f} GiB as float32 {'in RAM' if train_ds.data is not None else 'read lazily'}"
        f", validation {'in RAM' if val_ds.data is not None else 'read lazily'} (--preload {args.preload})")
    log(f"split grouped by {split.get('grouped_by', 'none')}: identical images shared between splits "
        f"{split.get('shared_images', '?')}, image_id values (source photos) shared {split.get('shared_image_ids', '?')}"
        + (f", {split['grouped_by']} values shared {split['shared_groups']}" if "shared_groups" in split else ""))

    model = build_model(config).to(device)
    if ck is not None:
        model.load_state_dict(ck["model"])
    elif hasattr(model, "init_from_data"):
        model.init_from_data(X for X, _ in qd.make_loader(train_ds, 64))
    raw_model = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda"
                                                          else None)
    opt = torch.optim.AdamW(raw_model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=3)
    history, start_epoch, best, bad_epochs = [], 1, math.inf, 0
    if ck is not None:
        opt.load_state_dict(ck["optimizer"]), sched.load_state_dict(ck["scheduler"])
        history, start_epoch = ck_history(out), ck["epoch"] + 1
        best, bad_epochs = ck["best_val_mse"], ck["bad_epochs"]
        torch.set_rng_state(ck["rng_cpu"])
        log(f"resumed from {out / 'last.pt'} at epoch {ck['epoch']} (best val MSE {best:.6g})")
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else nullcontext()

    svd_val = None
    if master:  # the target: SVD at the same rank on the validation samples
        per, _, _ = sb.evaluate(lambda X: sb.svd_reconstruct(X, config["rank"]), val_loader, device, "svd val")
        svd_val = sb.summarize(per)
        log(f"truncated SVD on validation: {sb.format_summary(svd_val, ('mse', 'cosine', 'energy'))}")

    def validate(epoch, t0, train_terms):
        """Validation metrics -> the history record of this epoch."""
        val = sb.summarize(sb.evaluate(lambda X: raw_model(X)[0].float(), val_loader, device, "val")[0])
        rec = {"epoch": epoch, **train_terms, **{f"val_{k}": val[k]["mean"] for k in sb.METRICS},
               "lr": opt.param_groups[0]["lr"], "seconds": time.time() - t0}
        if svd_val:
            rec.update({f"svd_val_{k}": svd_val[k]["mean"] for k in ("mse", "cosine", "energy")})
        return rec

    def save(epoch, improved):
        extra = {"bad_epochs": bad_epochs, "rng_cpu": torch.get_rng_state()}
        if improved:
            qd.atomic_save(make_checkpoint(raw_model, config, epoch, best, extra=extra), out / "best_model.pt")
        qd.atomic_save(make_checkpoint(raw_model, config, epoch, best, opt, sched, extra), out / "last.pt")
        qd.atomic_save(history, out / "history.json")
        plot_history(history, out / "loss_curves.png",
                     f"{config['arch']}, rank {config['rank']}, {config['normalization']} - {out}")

    if ck is None:  # epoch 0: the starting point (for subspace, the principal directions) is a candidate
        rec = validate(0, time.time(), {})
        best = rec["val_mse"]
        history.append(rec)
        if master:
            save(0, True)
        log(f"epoch   0 | start point | val mse {best:.5f} cos {rec['val_cosine']:.4f} energy "
            f"{rec['val_energy']:.4f}")

    from tqdm import tqdm
    stopped = "completed"
    for epoch in range(start_epoch, config["epochs"] + 1):
        t0 = time.time()
        model.train()
        sampler.set_epoch(epoch)
        sums, n = {}, 0
        nonfinite = False
        for X, _ in tqdm(train_loader, desc=f"epoch {epoch}/{config['epochs']}", leave=False, disable=not master):
            X = X.to(device, non_blocking=True)
            with amp:
                Xhat, A, B = model(X)
                terms = loss_terms(X, Xhat.float(), A.float(), B.float(), config["lambda_B"], config["lambda_ortho"])
                loss = terms["total"]
                if hasattr(raw_model, "objective"):  # subspace: train Ω on the energy it captures
                    loss = raw_model.objective(X, Xhat.float(), A.float(), B.float())
            terms["objective"] = loss.detach()  # what the optimiser minimises (= total, or the arch's own objective)
            if not torch.isfinite(loss):
                nonfinite = True
            if all_agree(nonfinite, world):
                nonfinite = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config["grad_clip"])
            opt.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item() * len(X)
            n += len(X)
        if nonfinite:
            stopped = "non-finite loss"
            kept = [str(out / f) for f in ("best_model.pt", "last.pt") if (out / f).exists()]
            log(f"epoch {epoch}: the loss became NaN/Inf; stopping. "
                + (f"The last good checkpoints ({', '.join(kept)}) are kept. " if kept else "No checkpoint was written. ")
                + "Lower --lr (the cache's files were checked and are finite).")
            break
        if world > 1:  # average the train terms over ranks
            t = torch.tensor([sums[k] for k in sorted(sums)] + [n], dtype=torch.float64)
            dist.all_reduce(t)
            sums, n = dict(zip(sorted(sums), t[:-1].tolist())), t[-1].item()

        rec = validate(epoch, t0, {f"train_{k}": v / n for k, v in sums.items()})
        val_mse = rec["val_mse"]
        sched.step(val_mse)
        improved = val_mse < best
        best, bad_epochs = (val_mse, 0) if improved else (best, bad_epochs + 1)
        history.append(rec)
        if master:
            save(epoch, improved)
        log(f"epoch {epoch:3d} | {arch_terms(config['arch'], rec)} | val mse {val_mse:.5f} cos "
            f"{rec['val_cosine']:.4f} energy {rec['val_energy']:.4f} | lr {rec['lr']:.2g} | {rec['seconds']:.1f}s"
            f"{' *' if improved else ''}")
        if on_epoch is not None:
            on_epoch(rec)
        if bad_epochs >= config["patience"]:
            stopped = f"early stop: no better validation MSE for {config['patience']} epochs"
            log(stopped)
            break
    if world > 1:
        dist.barrier()

    best_epoch = min((h for h in history if "val_mse" in h), key=lambda h: h["val_mse"], default={}).get("epoch")
    if best_epoch == 0 and len(history) > 1:
        log(f"warning: no epoch improved on the starting point (epoch 0, val MSE {history[0]['val_mse']:.6g}): "
            f"training made the model worse, so best_model.pt holds the starting point. Try a lower --lr.")
    result = None
    if master and test_at_end and (out / "best_model.pt").exists():
        result = test_report(out / "best_model.pt", split["test"], device)
        result["stopped"] = stopped
    if world > 1:
        dist.destroy_process_group()
    if stopped == "non-finite loss":
        raise SystemExit(2)
    return result


def arch_terms(arch, rec):
    """The train terms that mean something for the arch: subspace optimises its own objective (the energy left
    outside the nested prefixes), so its B-regulariser and orthogonality terms are not shown."""
    if arch == "subspace":
        return f"train objective {rec['train_objective']:.5f} (mse {rec['train_recon']:.5f})"
    return (f"train loss {rec['train_objective']:.5f} (mse {rec['train_recon']:.5f} b_reg {rec['train_b_reg']:.3g} "
            f"ortho {rec['train_ortho']:.3g})")


def ck_history(out):
    p = Path(out) / "history.json"
    return json.loads(p.read_text()) if p.exists() else []


def test_report(ckpt_path, test_idx, device):
    """Best model vs truncated SVD at the same rank on the same test samples, same normalisation."""
    model, ck = load_checkpoint(ckpt_path, device)
    cfg = ck["config"]
    ds = qd.FeatureDataset(cfg["cache_dir"], test_idx, cfg["normalization"])
    loader = qd.make_loader(ds, 64)
    nn_per, _, _ = sb.evaluate(lambda X: model(X)[0].float(), loader, device, "test NN")
    svd_per, _, _ = sb.evaluate(lambda X: sb.svd_reconstruct(X, cfg["rank"]), loader, device, "test SVD")
    nn_s, svd_s = sb.summarize(nn_per), sb.summarize(svd_per)
    print(f"test (n={len(ds)}, best epoch {ck['epoch']}, rank {cfg['rank']}, {cfg['normalization']}):")
    print(f"  {cfg['arch']:>10}: {sb.format_summary(nn_s, ('cosine', 'energy', 'mse', 'rel_fro'))}")
    print(f"  {'SVD':>10}: {sb.format_summary(svd_s, ('cosine', 'energy', 'mse', 'rel_fro'))}")
    return {"nn": nn_s, "svd": svd_s, "best_epoch": ck["epoch"]}


if __name__ == "__main__":
    qd.run_cli(main)
