"""
Where in the image does the low-rank error lie? H×W channel maps (16×16 for Qwen2.5-VL at 448²; the
cache's token grid in general), per-token error maps (also over the image with the data set's bbox),
the sample's spectrum, and an interactive HTML view.

    python visualize_svd_nn.py --image_idx 0 --rank 128 --results_dir results
"""

import argparse
import html
import json
from pathlib import Path

import numpy as np
import torch

from lowrank import metrics
from lowrank.cli import (
    HelpFormatter,
    UserError,
    add_checkpoint,
    nonneg_int,
    out_folder,
    positive_int,
    run_cli,
)
from lowrank.dataset import FeatureDataset, cached_image
from lowrank.feature_cache import (
    cache_grid,
    cache_image_size,
    cached_indices,
    load_manifest,
    lossy_note,
)
from lowrank.metrics import scale_bbox
from lowrank.plots import save
from lowrank.runs import load_run, output_stem, read_split

TEMPLATE = Path(__file__).resolve().parent / "lowrank" / "token_view.html"


def parse_channels(spec, dim):
    """'0-7' or '0,5,9-11' -> list of ints, each checked against dim."""
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    bad = [c for c in out if not 0 <= c < dim]
    if bad or not out:
        raise UserError(f"--channels {spec}: channels must lie in 0..{dim - 1}")
    return out


def compute(X, model, rank, hw, svd_method=metrics.DEFAULT_METHOD):
    """Everything drawn, for one normalised sample X [T, D] on an H×W token grid hw:
    reconstructions, per-token errors, spectrum."""
    with torch.no_grad():
        nn = model(X[None])[0][0].float()
    svd = metrics.svd_reconstruct(X[None], rank, svd_method)[0]
    S = metrics.singular_values(X[None])[0]
    d = {
        "X": X,
        "svd": svd,
        "nn": nn,
        "S": S,
        "energy": metrics.captured_energy(S),
        "hw": tuple(hw),
    }
    for name in ("svd", "nn"):
        tok = metrics.token_metrics(X[None], d[name][None])
        d[f"{name}_err"], d[f"{name}_cos"] = tok["err"][0].float(), tok["cos"][0].float()
        d[f"{name}_metrics"] = {
            k: v.item() for k, v in metrics.metrics(X[None], d[name][None]).items()
        }
    return d


def grid(v, hw):
    """[T] token values -> [H, W] map: token t at row t // W, column t % W."""
    return np.asarray(v, dtype=np.float64).reshape(hw)


def title_metrics(d, arch):
    s, n = d["svd_metrics"], d["nn_metrics"]
    return (
        f"SVD cos {s['cosine']:.4f} energy {s['energy']:.4f} rel_fro {s['rel_fro']:.4f}  |  "
        f"NN ({arch}) cos {n['cosine']:.4f} energy {n['energy']:.4f} rel_fro {n['rel_fro']:.4f}"
    )


def fig_channels(d, channels, head, arch, image=None):
    """Rows: original, SVD, NN (one colour scale per channel, shared), |error| of SVD and NN (shared
    per channel)."""
    import matplotlib.pyplot as plt

    rows = [("original", "X"), ("SVD", "svd"), (f"NN ({arch})", "nn")]
    fig, ax = plt.subplots(
        5,
        len(channels),
        figsize=(2.3 * len(channels) + 1.5, 11),
        squeeze=False,
        layout="constrained",
    )
    for j, c in enumerate(channels):
        maps = [grid(d[k][:, c], d["hw"]) for _, k in rows]
        vmin, vmax = min(m.min() for m in maps), max(m.max() for m in maps)
        errs = [np.abs(maps[0] - maps[1]), np.abs(maps[0] - maps[2])]
        emax = max(e.max() for e in errs) or 1.0
        for i, m in enumerate(maps):
            im = ax[i, j].imshow(m, cmap="viridis", vmin=vmin, vmax=vmax)
        fig.colorbar(
            im, ax=ax[:3, j], shrink=0.7, location="bottom", pad=0.01, label=f"channel {c} value"
        )
        for i, e in enumerate(errs):
            im = ax[3 + i, j].imshow(e, cmap="magma", vmin=0, vmax=emax)
        fig.colorbar(
            im,
            ax=ax[3:, j],
            shrink=0.7,
            location="bottom",
            pad=0.01,
            label=f"|error| in channel {c}",
        )
        ax[0, j].set_title(f"channel {c}")
    for i, label in enumerate([r[0] for r in rows] + ["|X - SVD|", "|X - NN|"]):
        ax[i, 0].set_ylabel(label)
    for a in ax.flat:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(f"{head}\n{title_metrics(d, arch)}", fontsize=10)
    if image is not None:  # a thumbnail of the image the maps come from, top left
        th = fig.add_axes((0.0, 0.9, 0.09, 0.09))
        th.imshow(image)
        th.set_xticks([])
        th.set_yticks([])
        th.set_title("image", fontsize=7)
    return fig


def fig_errors(d, head, arch, image=None, bbox=None):
    hw = d["hw"]
    """Per-token ‖x - x̂‖ and cosine maps, SVD and NN on shared scales; with the image: error over the pixels."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    ncol = 3 if image is not None else 2
    fig, ax = plt.subplots(2, ncol, figsize=(4.6 * ncol, 8.6), squeeze=False)
    emax = max(d["svd_err"].max().item(), d["nn_err"].max().item())
    cmin = min(d["svd_cos"].min().item(), d["nn_cos"].min().item())
    for i, (name, label) in enumerate([("svd", "SVD"), ("nn", f"NN ({arch})")]):
        im = ax[i, 0].imshow(grid(d[f"{name}_err"], hw), cmap="magma", vmin=0, vmax=emax)
        fig.colorbar(im, ax=ax[i, 0], shrink=0.8)
        ax[i, 0].set_title(f"{label}: token error ‖x − x̂‖")
        im = ax[i, 1].imshow(grid(d[f"{name}_cos"], hw), cmap="viridis", vmin=cmin, vmax=1)
        fig.colorbar(im, ax=ax[i, 1], shrink=0.8)
        ax[i, 1].set_title(f"{label}: token cosine")
        if image is not None:
            ax[i, 2].imshow(image)
            # each token covers an (H / rows) x (W / columns) cell of the resized image
            H, W = image.shape[:2]
            im = ax[i, 2].imshow(
                grid(d[f"{name}_err"], hw),
                cmap="magma",
                vmin=0,
                vmax=emax,
                alpha=0.55,
                extent=(0, W, H, 0),
                interpolation="nearest",
            )
            fig.colorbar(im, ax=ax[i, 2], shrink=0.8)
            ax[i, 2].set_title(f"{label}: error over the image")
            if bbox is not None:
                ax[i, 2].add_patch(
                    Rectangle(
                        bbox[:2],
                        bbox[2],
                        bbox[3],
                        fill=False,
                        ec="cyan",
                        lw=2,
                        label="data set bbox",
                    )
                )
                ax[i, 2].legend(loc="lower right", fontsize=8)
    for a in ax.flat:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(f"{head}\n{title_metrics(d, arch)}", fontsize=10)
    fig.tight_layout()
    return fig


def fig_spectrum(d, rank, head):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    k = np.arange(1, len(d["S"]) + 1)
    ax[0].semilogy(k, d["S"].numpy())
    ax[0].set_title("singular values")
    ax[0].set_xlabel("index")
    ax[1].plot(k, d["energy"].numpy())
    e = d["energy"][rank - 1].item()
    ax[1].plot([rank], [e], "o", color="C3", label=f"rank {rank}: {e:.4f}")
    ax[1].set_title("captured energy of the best rank-k approximation")
    ax[1].set_xlabel("k")
    ax[1].legend()
    for a in ax:
        a.axvline(rank, color="C3", ls=":", lw=1)
        a.grid(alpha=0.3)
    fig.suptitle(head, fontsize=10)
    fig.tight_layout()
    return fig


def html_views(d, channels):
    """What the HTML page draws, computed here (and tested against an independent recomputation):
    per view a [channel][token] array (or one [token] array for the token views) and the colour
    scale [lo, hi] it is drawn on. original / SVD / NN of a channel share one scale; |X - SVD| and
    |X - NN| of a channel share one; the two token error maps share one; the two token cosine maps
    share one."""
    # [C, T]
    X, svd, nn = (np.asarray(d[k][:, channels], dtype=np.float64).T for k in ("X", "svd", "nn"))
    esvd, enn = np.abs(X - svd), np.abs(X - nn)
    lo = np.minimum(np.minimum(X.min(1), svd.min(1)), nn.min(1))
    hi = np.maximum(np.maximum(X.max(1), svd.max(1)), nn.max(1))
    emax = np.maximum(esvd.max(1), enn.max(1))
    tok = {
        k: np.asarray(d[k], dtype=np.float64) for k in ("svd_err", "nn_err", "svd_cos", "nn_cos")
    }
    terr = [0.0, float(max(tok["svd_err"].max(), tok["nn_err"].max()))]
    tcos = [float(min(tok["svd_cos"].min(), tok["nn_cos"].min())), 1.0]

    def per_channel(a, b):
        return [[float(x), float(y)] for x, y in zip(a, b)]

    views = {
        "X": ("original", X, per_channel(lo, hi), "viridis"),
        "svd": ("SVD", svd, per_channel(lo, hi), "viridis"),
        "nn": ("NN", nn, per_channel(lo, hi), "viridis"),
        "esvd": ("|X − SVD|", esvd, per_channel(0 * emax, emax), "magma"),
        "enn": ("|X − NN|", enn, per_channel(0 * emax, emax), "magma"),
        "svd_err": ("SVD token error ‖x − x̂‖", tok["svd_err"], terr, "magma"),
        "nn_err": ("NN token error ‖x − x̂‖", tok["nn_err"], terr, "magma"),
        "svd_cos": ("SVD token cosine", tok["svd_cos"], tcos, "viridis"),
        "nn_cos": ("NN token cosine", tok["nn_cos"], tcos, "viridis"),
    }
    return views


def write_html(d, channels, path, *, head, arch, image=None, bbox=None):
    """One self-contained HTML file: the H×W token grid over the resized image (opacity slider), a
    view and channel selector, a colour bar with ticks, the hovered token outlined and its values
    shown."""
    import base64
    import io

    from matplotlib import colormaps
    from PIL import Image

    def r5(a):
        return np.round(np.asarray(a, dtype=np.float64), 5).tolist()

    views = html_views(d, channels)
    lut = {
        c: [[int(255 * v) for v in colormaps[c](i / 255)[:3]] for i in range(256)]
        for c in ("viridis", "magma")
    }
    rows, cols = d["hw"]
    cell = max(24, round(640 / max(rows, cols)))  # display px per token
    img = ""
    if image is not None:
        buf = io.BytesIO()
        Image.fromarray(image).resize((cols * cell, rows * cell)).save(buf, "PNG")
        img = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    box = None
    if bbox is not None and image is not None:
        sx, sy = cols * cell / image.shape[1], rows * cell / image.shape[0]
        box = [bbox[0] * sx, bbox[1] * sy, bbox[2] * sx, bbox[3] * sy]
    data = {
        "channels": channels,
        "arch": arch,
        "rows": rows,
        "cols": cols,
        "cell": cell,
        "lut": lut,
        "bbox": box,
        "views": {
            k: {"label": lab, "values": r5(v), "scale": sc, "cmap": cm}
            for k, (lab, v, sc, cm) in views.items()
        },
    }
    options = "".join(f'<option value="{k}">{html.escape(v[0])}</option>' for k, v in views.items())
    W, H = cols * cell, rows * cell
    page = TEMPLATE.read_text()
    fields = {
        "TITLE": html.escape(head),
        "W": str(W),
        "H": str(H),
        "COLS": str(cols),
        "CELL": str(cell),
        "OPTIONS": options,
        "IMAGE": f'<img id="img" src="{img}" alt="image">' if img else "",
        "DATA": json.dumps(data),
    }
    for name, value in fields.items():
        page = page.replace(f"__{name}__", value)
    Path(path).write_text(page)


def get_args_parser():
    ap = argparse.ArgumentParser(
        description="Spatial layout of SVD and NN reconstructions and their errors.",
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--image_idx", type=nonneg_int, default=0, help="position in the chosen split")
    ap.add_argument(
        "--sample_id", type=int, default=None, help="a cache index instead of --image_idx"
    )
    add_checkpoint(ap)
    ap.add_argument("--cache_dir", default=None, help="default: the cache the model was trained on")
    ap.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test"],
        help="the split --image_idx counts in",
    )
    ap.add_argument("--channels", default="0-7", help="e.g. 0-7 or 0,5,100-103")
    ap.add_argument(
        "--html_channels",
        type=positive_int,
        default=32,
        help="channels selectable in the HTML view (the first N, plus --channels)",
    )
    ap.add_argument("--format", default="png", choices=["png", "pdf", "svg"], help="figure format")
    ap.add_argument("--dpi", type=positive_int, default=150, help="figure resolution")
    ap.add_argument("--out", default=None, help="output folder (default: <results_dir>/vis)")
    return ap


def pick_sample(args, idx, cache_dir):
    """The sample drawn -> (its cache index, where it sits in the run's split, the file name
    tag)."""
    if args.sample_id is not None:
        available = cached_indices(cache_dir)
        if args.sample_id not in set(available):
            raise UserError(
                f"--sample_id {args.sample_id} is not in cache {cache_dir} "
                f"(indices {available[0]}..{available[-1]}, {len(available)} cached)"
            )
        sid = args.sample_id
        split = read_split(args.results_dir)
        part = next((k for k in ("train", "val", "test") if sid in split[k]), None)
        tag = f"{part}{split[part].index(sid)}_sample{sid}" if part else f"sample{sid}"
        where = f"sample {sid} ({f'{part} split' if part else 'in no split'}" + (
            ": SEEN IN TRAINING, not a held-out result)" if part == "train" else ")"
        )
        if part == "train":
            print(
                f"note: sample {sid} is in the training split; its errors are not a held-out result"
            )
    else:
        if not 0 <= args.image_idx < len(idx):
            raise UserError(
                f"--image_idx {args.image_idx} out of range: the {args.split} split has {len(idx)} "
                f"samples (0..{len(idx) - 1})"
            )
        sid, where = (
            idx[args.image_idx],
            f"{args.split}[{args.image_idx}] = sample {idx[args.image_idx]}",
        )
        tag = f"{args.split}{args.image_idx}_sample{sid}"
    return sid, where, tag


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    run = load_run(
        args.results_dir, args.checkpoint, args.split, rank=args.rank, cache_dir=args.cache_dir
    )
    model, cfg, idx, cache_dir = run.model, run.config, run.indices, run.cache_dir
    sid, where, tag = pick_sample(args, idx, cache_dir)
    hw, size = cache_grid(cache_dir), cache_image_size(cache_dir)  # from the manifest
    r = cfg.rank
    X = FeatureDataset(cache_dir, [sid], cfg.normalization)[0][0]
    channels = parse_channels(args.channels, X.shape[1])
    d = compute(X, model, r, hw)
    meta = load_manifest(cache_dir).sample(sid)
    head = f"{where}, id {meta.id or '?'}, rank {r}, {cfg.normalization}{lossy_note(cache_dir)}" + (
        f"\nQ: {meta.question}  A: {meta.answers[0]}" if meta.question and meta.answers else ""
    )

    image, bbox = cached_image(cache_dir, sid), None
    if image is not None and meta.bbox and meta.image_size:
        bbox = scale_bbox(meta.bbox, meta.image_size, size)

    out = out_folder(args.out or Path(args.results_dir) / "vis", "--out")
    out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(f"{tag}_rank{r}", checkpoint=args.checkpoint)  # the tag names the split
    paths = []
    for name, fig in [
        ("channels", fig_channels(d, channels, head, cfg.arch, image)),
        ("errors", fig_errors(d, head, cfg.arch, image, bbox)),
        ("spectrum", fig_spectrum(d, r, head)),
    ]:
        p = out / f"{stem}_{name}.{args.format}"
        save(fig, p, dpi=args.dpi, bbox_inches="tight")
        paths.append(p)
    html_channels = sorted(set(range(min(args.html_channels, X.shape[1]))) | set(channels))
    p = out / f"{stem}_interactive.html"
    write_html(
        d, html_channels, p, head=head.replace("\n", " | "), arch=cfg.arch, image=image, bbox=bbox
    )
    paths.append(p)
    print(f"{where}: {title_metrics(d, cfg.arch)}")
    for p in paths:
        print(f"wrote {p}")
    return d, paths


if __name__ == "__main__":
    run_cli(main)
