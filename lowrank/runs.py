"""
The run folder a training writes and every later script reads: the split (split.json, seeded,
grouped by source photo), the resolved config (config.json), the checkpoint (best_model.pt) and the
history; read_split and load_run are the one way to read them back.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lowrank.cli import UserError, check_rank
from lowrank.config import RunConfig
from lowrank.feature_cache import (
    atomic_save,
    cached_indices,
    cached_shape,
    check_not_held,
    feature_path,
    load_manifest,
)
from lowrank.model import Checkpoint, load_checkpoint, read_checkpoint

SPLIT, CONFIG, BEST, LAST, HISTORY = (
    "split.json",
    "config.json",
    "best_model.pt",
    "last.pt",
    "history.json",
)
PARTS = ("train", "val", "test")


def train_command(results_dir):
    return f"python train_real_data.py --results_dir {results_dir}"


def read_split(results_dir):
    """split.json of a run: {train, val, test: [sample indices], and what it was made from}."""
    p = Path(results_dir) / SPLIT
    if not p.exists():
        raise UserError(f"{p} not found: it is written by training ({train_command(results_dir)})")
    try:
        s = json.loads(p.read_text())
        assert all(isinstance(s[k], list) for k in PARTS)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise UserError(
            f"{p} is not a split file (expected JSON with train, val and test lists); delete it and "
            f"train again ({train_command(results_dir)})"
        ) from None
    return s


def split_fingerprint(split):
    """A short hash of a split's three index lists: what a checkpoint records and load_run
    checks."""
    return hashlib.sha256(json.dumps([split[k] for k in PARTS]).encode()).hexdigest()[:16]


def first(indices, num=None):
    """The first num of a list of sample indices (--num_samples, --limit); all of them when num is
    None."""
    return indices[:num] if num else indices


def read_run(results_dir):
    """(RunConfig, split) of a training run's folder: the cache, normalisation and test set every
    later script uses."""
    p = Path(results_dir) / CONFIG
    if not p.exists():
        raise UserError(f"{p} not found: train first ({train_command(results_dir)})")
    check_not_held(results_dir)
    try:
        config = json.loads(p.read_text())
    except ValueError:
        raise UserError(
            f"{p} is not readable JSON (damaged or cut short?); it is rewritten by training: "
            f"{train_command(results_dir)} --resume"
        ) from None
    return RunConfig.from_dict(config, str(p)), read_split(results_dir)


@dataclass(frozen=True)
class Run:
    """A trained run as the reports read it: its factoriser (eval mode), checkpoint dict and typed
    config, the chosen split's sample indices and the cache they are read from."""

    model: torch.nn.Module
    checkpoint: Checkpoint
    config: RunConfig
    indices: list
    cache_dir: str

    @property
    def checkpoint_sha(self):
        """The content hash of the bytes the model was loaded from (read once: a file replaced
        meanwhile cannot give another hash than the weights that answer)."""
        return self.checkpoint.sha


def load_run(
    results_dir, checkpoint=None, split="test", *, rank=None, cache_dir=None, device="cpu"
):
    """-> Run, all from the results directory; the checkpoint must match the cache's feature shape
    and, when given, the rank."""
    results_dir = Path(results_dir)
    check_not_held(results_dir)
    ckpt = Path(checkpoint) if checkpoint else results_dir / BEST
    model, ck = load_checkpoint(ckpt, device)
    cfg = RunConfig.from_dict(ck.config, f"{ckpt}'s config")
    cache_dir = cache_dir or cfg.cache_dir
    shape = cached_shape(cache_dir)
    if rank is not None:
        check_rank(rank, min(shape))
    trained = cfg.shape
    if trained != shape:
        raise UserError(
            f"{ckpt} was trained on [{trained[0]}, {trained[1]}] features; the cache {cache_dir} holds "
            f"[{shape[0]}, {shape[1]}]: use a cache of the same encoder and image size, or train on this "
            f"one"
        )
    if rank is not None and rank != cfg.rank:
        raise UserError(
            f"--rank {rank} disagrees with the checkpoint {ckpt}, trained at rank {cfg.rank}"
        )
    parts = read_split(results_dir)
    if cfg.split_sha and cfg.split_sha != split_fingerprint(parts):
        raise UserError(
            f"{ckpt} was trained on another split than {Path(results_dir) / SPLIT} (its samples there may be ones it "
            f"trained on): score it with the run folder it was trained in"
        )
    return Run(model, ck, cfg, parts[split], cache_dir)


def output_stem(stem, split="test", checkpoint=None):
    """A report's file stem that says what it describes: the stem alone for the test split of
    best_model.pt, else _<split> and _<checkpoint file name> appended, so reports of other splits or
    checkpoints never overwrite it."""
    if split != "test":
        stem += f"_{split}"
    if checkpoint and Path(checkpoint).name != BEST:
        stem += f"_{Path(checkpoint).stem}"
    return stem


def omega_basis(results_dir):
    """The subspace model's Ω orthonormalised (QR keeps the column order, so its prefixes serve
    every rank)."""
    p = Path(results_dir) / BEST
    if not p.exists():
        return None
    ck = read_checkpoint(p)
    if RunConfig.from_dict(ck.config).arch != "subspace":
        return None
    return torch.linalg.qr(ck.model["omega"].double())[0].float()


def read_history(results_dir):
    p = Path(results_dir) / HISTORY
    return json.loads(p.read_text()) if p.exists() else []


def make_split(indices, seed=42, fractions=(0.8, 0.1, 0.1), groups=None):
    """Seeded split of sample indices into train/val/test (80/10/10 by default). groups: {index:
    key}; samples with one key (one photo, one image asked several questions) always land in the
    same split. Without groups every sample is its own group."""
    indices = sorted(indices)
    keys = [groups[i] if groups else i for i in indices]
    order = list(dict.fromkeys(keys))  # group keys by first appearance
    members = {k: [] for k in order}
    for i, k in zip(indices, keys):
        members[k].append(i)
    perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed)).tolist()
    n_train = int(round(fractions[0] * len(indices)))
    n_val = int(round(fractions[1] * len(indices)))
    out = {"train": [], "val": [], "test": []}
    for g in perm:
        part = (
            "train" if len(out["train"]) < n_train else "val" if len(out["val"]) < n_val else "test"
        )
        out[part] += members[order[g]]
    return {k: sorted(v) for k, v in out.items()}


GROUP_AUTO = "auto"


def split_groups(cache_dir, indices, group_by=GROUP_AUTO):
    """{index: group key} from the manifest: group_by a per-sample field (image_id: the photo a
    sample was made from), 'fingerprint' (identical image bytes), 'none', or 'auto' = image_id where
    the source has it, else fingerprint. Returns (groups or None, the field used)."""
    samples = load_manifest(cache_dir).samples
    meta = [samples[i].fields if i in samples else {} for i in indices]
    if group_by == GROUP_AUTO:
        group_by = next(
            (f for f in ("image_id", "fingerprint") if meta and all(f in m for m in meta)), "none"
        )
    if group_by == "none":
        return None, "none"
    missing = [i for i, m in zip(indices, meta) if group_by not in m]
    if missing:
        raise UserError(
            f"--group_by {group_by}: the manifest of '{cache_dir}' has no '{group_by}' for sample "
            f"{missing[0]} ({len(missing)} samples); use another field or --group_by none"
        )
    return {i: json.dumps(m[group_by]) for i, m in zip(indices, meta)}, group_by


def shared_between_splits(cache_dir, split, field):
    """How many distinct values of a manifest field (e.g. the image fingerprint) occur in more than
    one split."""
    samples = load_manifest(cache_dir).samples
    seen = {}
    for part in ("train", "val", "test"):
        for i in split[part]:
            v = samples[i].fields.get(field) if i in samples else None
            if v is not None:
                seen.setdefault(json.dumps(v), set()).add(part)
    return sum(len(parts) > 1 for parts in seen.values())


def saved_split(results_dir, made_from, cache_dir):
    """A run's split.json, refused when it was made from other settings (made_from: seed, sample
    count, cache, grouping, test share) or names samples the cache does not hold."""
    p, s = Path(results_dir) / SPLIT, read_split(results_dir)
    old = dict(s, cache_dir=str(Path(s["cache_dir"]).resolve())) if "cache_dir" in s else s
    diff = {k: (old[k], v) for k, v in made_from.items() if k in old and old[k] != v}
    if diff:
        raise UserError(
            f"{p} was made with "
            + ", ".join(f"{k} {a!r}" for k, (a, _) in diff.items())
            + "; this run asks for "
            + ", ".join(f"{k} {b!r}" for k, (_, b) in diff.items())
            + ". Pass --resplit to replace it (its test set then changes), or use another "
            "--results_dir"
        )
    missing = [
        i for k in ("train", "val", "test") for i in s[k] if not feature_path(cache_dir, i).exists()
    ]
    if missing:
        raise UserError(
            f"{p} names samples that are not in cache '{cache_dir}' (e.g. {missing[:5]}): "
            f"was it made for another cache?"
        )
    return s


def load_or_make_split(
    results_dir,
    cache_dir,
    *,
    seed=42,
    max_samples=None,
    group_by=GROUP_AUTO,
    resplit=False,
    test_share=0.1,
):
    """split.json in results_dir: read it if present (so every script sees the same test set), else
    make and save. A saved split made from another seed, sample count, cache, grouping or test share
    is refused (resplit=True replaces it). test_share: the test split's share of the samples
    (validation 0.1, training the rest)."""
    if not 0 < test_share < 0.9:
        raise UserError(
            f"--test_share {test_share}: choose a share between 0 and 0.9 (validation takes 0.1)"
        )
    p = Path(results_dir) / SPLIT
    made_from = {
        "seed": seed,
        "max_samples": max_samples,
        "cache_dir": str(Path(cache_dir).resolve()),
        "group_by": group_by,
        # older split.json files: the default
        **({"test_share": test_share} if test_share != 0.1 else {}),
    }
    if p.exists() and not resplit:
        return saved_split(results_dir, made_from, cache_dir)
    idx = cached_indices(cache_dir)
    if max_samples:
        idx = idx[:max_samples]
    if len(idx) < 3:
        raise UserError(
            f"cache '{cache_dir}' holds {len(idx)} samples; a train/val/test split needs at least 3"
        )
    groups, field = split_groups(cache_dir, idx, group_by)
    s = make_split(idx, seed, (0.9 - test_share, 0.1, test_share), groups=groups)
    empty = [k for k in PARTS if not s[k]]
    if empty:
        raise UserError(
            f"{len(idx)} samples{f' in {len(set(groups.values()))} {field} groups' if groups else ''} "
            f"leave the {' and '.join(empty)} split empty ({0.9 - test_share:.0%} / 10% / {test_share:.0%}); "
            f"use more samples (--max_samples) "
            f"or --group_by none"
        )
    s.update(
        made_from,
        grouped_by=field,
        num_samples=len(idx),
        shared_images=shared_between_splits(cache_dir, s, "fingerprint"),
        # source photos / image ids
        shared_image_ids=shared_between_splits(cache_dir, s, "image_id"),
        **({"shared_groups": shared_between_splits(cache_dir, s, field)} if groups else {}),
    )
    Path(results_dir).mkdir(parents=True, exist_ok=True)
    atomic_save(s, p)
    return s
