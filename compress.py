"""
How many bytes per image keep the features, and which method gets there? Feature codecs measured at
a size, a compressed cache that every script reads transparently, and the factoriser itself
quantised and pruned.

    python compress.py study --results_dir results                     # rate-distortion on the test split
    python compress.py cache --results_dir results --codec pca_int8 --rank 256 --out feature_cache_pca256
    python compress.py model --results_dir results                     # int8 and pruned factorisers

Every codec works on the features as training sees them (the run's normalisation); bytes per image
are exact: codes plus their scales. A shared basis (PCA of the training split's tokens, or the
subspace model's Ω orthonormalised) is stored once per data set; its bytes are reported apart and
amortised over the cache's images. Codecs (feature_codecs.py; the setting is the rank r where there
is one): fp32, fp16, bf16 (floats); int8, int4 (per-token absmax); svd_fp16, svd_int8 (per-image SVD
factors); pca_fp16/int8/int4 (coefficients on the training split's principal directions);
omega_fp16/int8/int4 (the same on a subspace model's Ω, orthonormalised).
"""

import argparse
import copy
import json
import warnings
from pathlib import Path

import torch
import torch.nn.utils.prune as prune
from tqdm import tqdm

from lowrank import metrics
from lowrank.cli import (
    HelpFormatter,
    UserError,
    check_rank,
    name_arg,
    out_folder,
    parse_ranks,
    positive_int,
    run_cli,
)
from lowrank.dataset import FeatureDataset, principal_basis
from lowrank.feature_cache import (
    MANIFEST,
    atomic_save,
    cached_indices,
    cached_shape,
    check_values,
    feature_path,
    read_manifest,
    tensor_sha,
)
from lowrank.feature_codecs import (
    BASIS,
    CODECS,
    SHARED_BASIS,
    codec_settings,
    decode,
    encode,
    family,
    payload_bytes,
)
from lowrank.model import Subspace, make_checkpoint, quantized_state
from lowrank.plots import pyplot, save
from lowrank.quantize import dequantize_rows, quantize_rows
from lowrank.reports import write_csv
from lowrank.runs import first, load_run, omega_basis, read_run

# --------------------------------------------------------------------------------------------------
# shared bases and the run's data


def source_run(results_dir, cache_dir=None):
    """(config, split, cache) of the run whose features are compressed: never an already compressed
    cache."""
    cfg, split = read_run(results_dir)
    cache = cache_dir or cfg.cache_dir
    codec = read_manifest(cache).get("codec")
    if codec:
        raise UserError(
            f"'{cache}' is already a compressed cache ({codec['name']}): compress the original cache it was made from"
        )
    return cfg, split, cache


# --------------------------------------------------------------------------------------------------
# 1. rate-distortion study


def study(args):
    cfg, split, cache = source_run(args.results_dir, args.cache_dir)
    norm = cfg.normalization
    T, D = cached_shape(cache)
    n_cache = len(cached_indices(cache))
    idx = first(split[args.split], args.num_samples)
    X = torch.stack([x for x, _ in FeatureDataset(cache, idx, norm)])
    ranks = parse_ranks(args.ranks, min(T, D))
    pca = principal_basis(cache, split["train"], norm).float()
    omega = omega_basis(args.results_dir)
    settings = codec_settings(
        args.codecs.split(","), ranks, T, D, 0 if omega is None else omega.shape[1]
    )
    print(
        f"{len(idx)} {args.split} images [{T}, {D}] from {cache} ({norm}); PCA basis from {len(split['train'])} "
        f"training images; "
        + (
            f"Ω from {args.results_dir}"
            if omega is not None
            else "no subspace model: no omega codecs"
        )
    )
    rows = measure_codecs(X, settings, pca, omega, n_cache)
    front = pareto(rows)
    for r in rows:
        r["pareto"] = (r["codec"], r["rank"]) in front
    best = smallest(rows, (0.99, 0.995, 0.999))
    print_study(rows, best)
    stem = Path(args.results_dir) / f"rd_{args.name or args.split}"
    Path(f"{stem}.json").write_text(
        json.dumps(
            {
                "split": args.split,
                "n": len(idx),
                "shape": [T, D],
                "cache_dir": cache,
                "normalization": norm,
                "cache_images": n_cache,
                "rows": rows,
                "smallest": {c: {str(t): h for t, h in v.items()} for c, v in best.items()},
            },
            indent=1,
        )
    )
    write_csv(f"{stem}.csv", rows)
    plot_rd(rows, f"{stem}.png", f"{len(idx)} {args.split} images [{T}, {D}], {norm}")
    print(f"wrote {stem}.json, {stem}.csv, {stem}.png")
    return rows


def measure_codecs(X, settings, pca, omega, n_cache):
    """Bytes and quality of every (codec, rank) setting on the features X -> one row each."""
    T, D = X.shape[1:]
    rows = []
    for codec, r in tqdm(settings, desc="codecs", leave=False):
        basis = pca if family(codec) == "pca" else omega
        payloads = [encode(codec, x, r, basis) for x in X]
        Xh = torch.stack([decode(codec, p, basis) for p in payloads])
        m = metrics.summarize({k: v.tolist() for k, v in metrics.metrics(X, Xh).items()})
        per_image = payload_bytes(payloads[0])
        shared = 2 * D * r if family(codec) in SHARED_BASIS else 0  # the basis, stored once as fp16
        rows.append(
            {
                "codec": codec,
                "rank": r,
                "bytes_per_image": per_image,
                "shared_bytes": shared,
                "bytes_per_image_amortised": per_image + shared / n_cache,
                "ratio_to_fp32": T * D * 4 / per_image,
                "ratio_to_bf16": T * D * 2 / per_image,
                **{k: m[k]["mean"] for k in ("cosine", "energy", "rel_fro")},
                "cosine_std": m["cosine"]["std"],
            }
        )
    return rows


def print_study(rows, best):
    print(
        f"{'codec':<12}{'rank':>5}{'bytes/image':>13}{'+shared/img':>12}{'x fp32':>8}{'cosine':>9}{'energy':>9}"
        f"{'rel_fro':>9}  pareto"
    )
    for r in rows:
        print(
            f"{r['codec']:<12}{r['rank'] or '':>5}{r['bytes_per_image']:>13,}"
            f"{r['bytes_per_image_amortised'] - r['bytes_per_image']:>12.0f}{r['ratio_to_fp32']:>8.1f}"
            f"{r['cosine']:>9.5f}{r['energy']:>9.5f}{r['rel_fro']:>9.5f}  {'*' if r['pareto'] else ''}"
        )
    print(
        "smallest setting of each codec (bytes/image, shared basis amortised) reaching a cosine of:"
    )
    for codec, hits in best.items():
        print(
            f"  {codec:<12}"
            + "  ".join(
                f">= {t}: "
                + (
                    f"{h['codec']}{'' if h['rank'] is None else ' r=' + str(h['rank'])}"
                    f" {h['bytes_per_image_amortised']:,.0f} B"
                    if h
                    else "none"
                )
                for t, h in hits.items()
            )
        )


def pareto(rows):
    """(codec, rank) of the settings no other setting beats on both bytes (amortised) and cosine."""
    return {
        (r["codec"], r["rank"])
        for r in rows
        if not any(
            o["bytes_per_image_amortised"] <= r["bytes_per_image_amortised"]
            and o["cosine"] >= r["cosine"]
            and (o["bytes_per_image_amortised"], o["cosine"])
            != (r["bytes_per_image_amortised"], r["cosine"])
            for o in rows
        )
    }


def smallest(rows, targets):
    out = {}
    for codec in dict.fromkeys(r["codec"] for r in rows):
        mine = sorted(
            (r for r in rows if r["codec"] == codec), key=lambda r: r["bytes_per_image_amortised"]
        )
        out[codec] = {t: next((r for r in mine if r["cosine"] >= t), None) for t in targets}
    return out


def plot_rd(rows, path, title):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=150)
    for c, codec in enumerate(dict.fromkeys(r["codec"] for r in rows)):
        mine = sorted(
            (r for r in rows if r["codec"] == codec), key=lambda r: r["bytes_per_image_amortised"]
        )
        ax.plot(
            [r["bytes_per_image_amortised"] for r in mine],
            [r["cosine"] for r in mine],
            "o" if len(mine) > 1 else "s",
            label=codec,
            ms=4,
            color=plt.cm.tab20(c % 20),
            ls=("--" if codec.startswith("omega") else "-") if len(mine) > 1 else "none",
        )  # omega starts at PCA: dashed, so both show
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["bytes_per_image_amortised"])
    ax.plot(
        [r["bytes_per_image_amortised"] for r in front],
        [r["cosine"] for r in front],
        "k--",
        lw=1,
        label="Pareto front",
    )
    ax.scatter(
        [r["bytes_per_image_amortised"] for r in front],
        [r["cosine"] for r in front],
        s=60,
        facecolors="none",
        edgecolors="k",
    )
    for t in (0.99, 0.999):
        ax.axhline(t, color="grey", lw=0.5, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per image (a shared basis amortised over the cache)")
    ax.set_ylabel("cosine to the original features")
    ax.set_ylim(max(0.9, min(r["cosine"] for r in rows) - 0.005), 1.0005)
    ax.set_title(f"Rate-distortion: {title}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    save(fig, path)


# --------------------------------------------------------------------------------------------------
# 2. a compressed cache


def write_cache(args):
    cfg, split, cache = source_run(args.results_dir, args.cache_dir)
    norm = cfg.normalization
    T, D = cached_shape(cache)
    codec, r = args.codec, args.rank
    if family(codec) in ("svd", "pca", "omega"):
        check_rank(r, min(T, D))
    basis = (
        principal_basis(cache, split["train"], norm).float()
        if family(codec) == "pca"
        else (omega_basis(args.results_dir) if family(codec) == "omega" else None)
    )
    if family(codec) == "omega" and basis is None:
        raise UserError(f"--codec {codec} needs a subspace model in {args.results_dir}")
    out = out_folder(args.out, "--out")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty: choose a new folder")
    out.mkdir(parents=True)
    src = read_manifest(cache)  # written on, as it is
    idx = cached_indices(cache)
    if basis is not None:
        basis = basis[:, :r].contiguous()
        atomic_save(basis, out / BASIS)
    cos, total = [], 0
    ds = FeatureDataset(cache, idx, norm, preload=False)
    for k in tqdm(range(len(ds)), desc=f"compress {codec}"):
        X, i = ds[k]
        p = encode(codec, X, r, basis)
        atomic_save(p, feature_path(out, i))
        total += feature_path(out, i).stat().st_size
        # NaN/Inf codes are refused, not averaged
        Xh = check_values(decode(codec, p, basis), feature_path(out, i))
        cos.append(metrics.metrics(X[None], Xh[None])["cosine"].item())
    cs = metrics.summarize({"cosine": cos})["cosine"]
    m = {
        "encoder": src["encoder"],
        "source": src.get("source", {}),
        "samples": src["samples"],
        "failed": src.get("failed", {}),
        "codec": {
            "name": codec,
            "rank": r,
            "stored_normalization": norm,
            "source_cache": str(Path(cache).resolve()),
            "basis_fitted_on": f"train split of {Path(args.results_dir).resolve()} ({len(split['train'])} images)"
            if basis is not None
            else None,
            "basis_sha": tensor_sha(basis) if basis is not None else None,
            "cosine_mean": cs["mean"],
            "cosine_std": cs["std"],
            "n": cs["n"],
            "bytes_on_disk": total,
        },
    }
    atomic_save(m, out / MANIFEST)
    src_bytes = sum(feature_path(cache, i).stat().st_size for i in idx)
    print(
        f"wrote {len(idx)} images to {out} with {codec}{f' rank {r}' if r else ''}: {total / 2**20:.1f} MiB "
        f"(source {src_bytes / 2**20:.1f} MiB, x{src_bytes / total:.1f} smaller); cosine to the source "
        f"{cs['mean']:.5f} ± {cs['std']:.5f} (on {norm} features)"
    )
    return m


# --------------------------------------------------------------------------------------------------
# 3. the factoriser compressed: int8 weights and magnitude pruning


def quantize_model(model):
    """int8: the symmetric MLP's Linear layers through torch's dynamic quantisation; subspace's Ω as
    int8 with one float32 scale per column (dequantised on load: the same Ω every later script
    sees)."""
    if isinstance(model, Subspace):
        q = quantize_rows(model.omega.detach().T.contiguous(), 8)  # per column of Ω
        m = copy.deepcopy(model)
        with torch.no_grad():
            m.omega.copy_(dequantize_rows(q).T)
        return m, {"omega_int8": q}
    # torch 2.x: eager-mode quantisation is announced as moving to torchao
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8
        ), None


def prune_model(model, amount):
    """Global L1 magnitude pruning of every weight matrix (Ω for subspace), then made permanent."""
    m = copy.deepcopy(model)
    params = [(mod, "weight") for mod in m.modules() if isinstance(mod, torch.nn.Linear)] or [
        (m, "omega")
    ]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    for mod, name in params:
        prune.remove(mod, name)
    zeros = sum(int((getattr(mod, name) == 0).sum()) for mod, name in params)
    return m, zeros / sum(getattr(mod, name).numel() for mod, name in params)


def model_table(args):
    cfg, split, cache = source_run(args.results_dir, args.cache_dir)
    run = load_run(args.results_dir, cache_dir=cache)  # the split's fingerprint checked
    model, ck = run.model, run.checkpoint
    idx = first(run.indices, args.num_samples)
    X = torch.stack([x for x, _ in FeatureDataset(cache, idx, cfg.normalization)])
    xb = metrics.timing_batch(X, 64)
    out = Path(args.results_dir)
    variants = [("float32", model, None, None)]
    qm, extra = quantize_model(model)
    variants.append(("int8", qm, extra, None))
    for a in (0.3, 0.5, 0.7):
        pm, zeros = prune_model(model, a)
        variants.append((f"pruned {int(a * 100)}%", pm, None, zeros))
    rows, base = [], None
    print(
        f"{cfg.arch} rank {cfg.rank} from {args.results_dir}; test n={len(X)}; CPU ms/sample at batch 64 "
        f"(median of 3 after a warm-up), threads {torch.get_num_threads()}"
    )
    print(
        f"{'variant':<12}{'size on disk':>14}{'zeros':>8}{'ms/sample':>11}{'x float32':>10}{'cosine':>9}{'change':>10}"
    )
    for name, m, extra, zeros in variants:
        m.eval()
        with torch.no_grad():
            cos = (
                metrics.metrics(X, torch.cat([m(x)[0].float() for x in X.split(64)]))["cosine"]
                .mean()
                .item()
            )
        ms = metrics.time_ms(lambda x: m(x)[0], xb)
        fname = out / (
            "best_model.pt"
            if name == "float32"
            else f"model_{name.replace(' ', '_').replace('%', '')}.pt"
        )
        if name != "float32":
            sd_model = m if extra is None or cfg.arch != "subspace" else model
            ckd = make_checkpoint(
                sd_model, dict(ck.config, compressed=name), ck.epoch, ck.best_val_mse, extra=extra
            )
            # quantised Linear layers: keep the int8 weights only
            if name == "int8" and cfg.arch != "subspace":
                ckd["model"] = {k: v for k, v in quantized_state(m).items()}
            if name == "int8" and cfg.arch == "subspace":
                ckd["model"] = {k: v for k, v in model.state_dict().items() if k != "omega"}
            atomic_save(ckd, fname)
        size = fname.stat().st_size
        base = base or (ms, cos, size)
        rows.append(
            {
                "variant": name,
                "file": str(fname),
                "bytes": size,
                "zeros": zeros,
                "ms_per_sample": ms,
                "speed_ratio": base[0] / ms,
                "cosine": cos,
                "cosine_change": cos - base[1],
            }
        )
        print(
            f"{name:<12}{size / 2**20:>11.2f} MiB{'' if zeros is None else f'{zeros:.0%}':>8}{ms:>11.2f}"
            f"{base[0] / ms:>10.2f}{cos:>9.5f}{cos - base[1]:>+10.5f}"
        )
    (out / "compressed_models.json").write_text(json.dumps(rows, indent=1))
    print(
        f"wrote {out / 'compressed_models.json'} and the checkpoints; compare/visualise load them with --checkpoint"
    )
    return rows


def get_args_parser():
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument(
        "--results_dir",
        default="results",
        help="a training run: split, normalisation, (subspace) Ω",
    )
    run.add_argument("--cache_dir", default=None, help="default: the run's cache")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    programs = ap.add_subparsers(
        dest="task",
        required=True,
        metavar="{study,cache,model}",
        help="the program (its own --help)",
    )
    sub = dict(parents=[run], formatter_class=HelpFormatter)

    study_ap = programs.add_parser("study", help="rate-distortion of every codec", **sub)
    study_ap.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="images measured"
    )
    study_ap.add_argument(
        "--num_samples", type=positive_int, default=None, help="the first N of the split"
    )
    study_ap.add_argument("--codecs", default=",".join(CODECS), help="codecs measured")
    study_ap.add_argument("--ranks", default="16,32,64,128,256", help="ranks of the rank codecs")
    study_ap.add_argument(
        "--name", type=name_arg, default=None, help="output stem rd_<name> (default: the split)"
    )
    study_ap.set_defaults(program=study)

    cache_ap = programs.add_parser("cache", help="write a compressed cache", **sub)
    cache_ap.add_argument("--codec", default="pca_int8", choices=CODECS, help="the codec")
    cache_ap.add_argument(
        "--rank", type=int, default=256, help="its rank, for svd/pca/omega codecs"
    )
    cache_ap.add_argument("--out", required=True, help="the new cache's folder")
    cache_ap.set_defaults(program=write_cache)

    model_ap = programs.add_parser(
        "model", help="the factoriser quantised to int8 and pruned", **sub
    )
    model_ap.add_argument(
        "--num_samples", type=positive_int, default=None, help="the first N of the test split"
    )
    model_ap.set_defaults(program=model_table)
    return ap


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.task == "study":
        unknown = [c for c in args.codecs.split(",") if c not in CODECS]
        if unknown:
            raise UserError(f"--codecs {','.join(unknown)}: choose from {', '.join(CODECS)}")
    return args.program(args)


if __name__ == "__main__":
    run_cli(main)
