"""
The on-disk feature cache: one features_<i>.pt [T, D] per sample (i = the row in the source),
manifest.json (the encoder, the source, every sample's metadata and failures: the one record of T, D
and the token grid) and the append-only sample log; atomic writes, the cache lock, the checks of
every file read back, and the normalisation every script applies to what it reads.
"""

import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lowrank.cli import BadFeature, UserError
from lowrank.jsonl import append_lines, complete_text
from lowrank.metrics import box_mask

MANIFEST = "manifest.json"
# append-only, one line per extracted sample: survives kill -9 and manifest rebuilds
SAMPLE_LOG = "samples.jsonl"
LOCK = ".lock"
HOST = socket.gethostname().replace(".", "_").replace("-", "_")


def extract_command(cache_dir="feature_cache_real"):
    return (
        f"python qwenvl_dataloader.py --dataset_dir <parquet dir | image folder | list.jsonl> "
        f"--cache_dir {cache_dir}   (add --model tiny-random to run offline)"
    )


def feature_path(cache_dir, i):
    return Path(cache_dir) / f"features_{i}.pt"


def atomic_save(obj, path):
    """Write to .<name>.<host>-<pid>.tmp, then rename: a killed run never leaves a half-written
    file. A failed write (a full disk, a read-only folder) removes its temp file and raises OSError
    naming the path; the file that was there before is intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{HOST}-{os.getpid()}.tmp")
    try:
        if isinstance(obj, (dict, list)) and path.suffix == ".json":
            tmp.write_text(json.dumps(obj, indent=1))
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as RuntimeError
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        code = getattr(e, "errno", None) or (
            errno.ENOSPC if shutil.disk_usage(path.parent).free < 2**20 else None
        )
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from None


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(folder, pattern=".*.tmp"):
    """Delete temp files left by killed processes of this host; those of live processes (another
    extraction or training on the same folder) and of other hosts are left alone."""
    for tmp in Path(folder).glob(pattern):
        owner = tmp.name[: -len(".tmp")].rsplit(".", 1)[-1]
        host, _, pid = owner.rpartition("-")
        if host in (HOST, "") and (not pid.isdigit() or not pid_alive(int(pid))):
            tmp.unlink(missing_ok=True)


def lock_holder(folder):
    """'PID n (what it runs)' from a folder's lock file, as its holder wrote it."""
    try:
        pid, _, what = (Path(folder) / LOCK).read_text().strip().partition(" ")
    except OSError:
        return "another process"
    return f"PID {pid}" + (f" ({what})" if what else "") if pid else "another process"


@contextmanager
def folder_lock(folder, wait=None, what=""):
    """Exclusive flock on <folder>/.lock, the holder's PID and `what` written into it. wait: seconds
    to wait for another holder (None: no limit); one still there after that is named in a UserError.
    The kernel drops the lock when its process dies, so a killed holder never blocks anyone."""
    fd = os.open(Path(folder) / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        deadline, told = None if wait is None else time.monotonic() + wait, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise UserError(
                        f"{folder} is in use by {lock_holder(folder)}; wait for it to finish, or use another folder"
                    ) from None
                if not told:
                    print(f"waiting for {folder}: in use by {lock_holder(folder)}", file=sys.stderr)
                    told = True
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {what}".strip().encode(), 0)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def check_not_held(folder):
    """A reader of a run folder: refused in one line while a training holds the folder's lock (its
    checkpoints may be replaced while they are read). Only looks; never holds the lock."""
    path = Path(folder) / LOCK
    if not path.exists():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise UserError(
            f"{folder} is in use by {lock_holder(folder)}: its checkpoints change while it trains; wait for it to "
            f"finish, or read a copy of the folder"
        ) from None
    finally:
        os.close(fd)


def cache_lock(cache_dir):
    """The cache's lock, held while the manifest is read, merged and written: any number of
    processes may extract into one cache. A holder that keeps it past LOWRANK_LOCK_TIMEOUT seconds
    (default 300; a hung process) is named and this process stops."""
    return folder_lock(
        cache_dir, float(os.environ.get("LOWRANK_LOCK_TIMEOUT", 300)), "writing the manifest"
    )


def _check_shape(x, path, shape):
    if (
        not isinstance(x, torch.Tensor)
        or not x.is_floating_point()
        or x.dim() != 2
        or (shape is not None and tuple(x.shape) != tuple(shape))
    ):
        want = f"[{shape[0]}, {shape[1]}]" if shape is not None else "2-d"
        raise BadFeature(
            f"{path}: expected a floating {want} tensor (the cache's tokens x dim), got "
            f"{type(x).__name__} {list(getattr(x, 'shape', []))} {getattr(x, 'dtype', '')}"
        )


def read_feature(path, shape=None):
    """Load one cached tensor (memory-mapped: no copy until it is converted or normalised); raises
    BadFeature naming the file if it is unreadable, not of shape (T, D) (when given), non-finite, or
    so large that squaring it overflows float32 (the layer norm's variance and the loss square it: a
    finite 3e38 would). One pass over the data (aminmax) does all the value checks."""
    try:
        x = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise BadFeature(f"{path}: unreadable feature file ({type(e).__name__}: {e})") from None
    _check_shape(x, path, shape)
    return check_values(x, path)


def check_values(x, path):
    """x, when finite, finite once squared and not constant (no image gives that: all zeros, or any
    one value, has no content to factorise, and layer norm turns it into zeros, whose cosine is
    undefined); else BadFeature naming the file it came from."""
    lo, hi = (float(v) for v in torch.aminmax(x))
    if lo == hi:
        raise BadFeature(
            f"{path}: all values are {lo:g}: a constant has no content to factorise; re-extract it (delete the file "
            f"and rerun qwenvl_dataloader.py)"
        )
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise BadFeature(
            f"{path}: contains NaN or Inf values; re-extract it (delete the file and rerun qwenvl_dataloader.py)"
        )
    if max(-lo, hi) ** 2 * x.shape[-1] >= torch.finfo(torch.float32).max:
        raise BadFeature(
            f"{path}: finite values (largest |x| {max(-lo, hi):.3g}) overflow float32 once squared "
            f"in the normalisation and the loss; re-extract it (delete the file and rerun "
            f"qwenvl_dataloader.py)"
        )
    return x


def tensor_sha(x):
    """A short hash of a tensor's shape, dtype and values (not of its file: torch.save's bytes
    depend on the name)."""
    x = x.detach().cpu().contiguous()
    return hashlib.sha256(
        str((tuple(x.shape), str(x.dtype))).encode() + x.view(torch.uint8).numpy().tobytes()
    ).hexdigest()[:16]


def check_feature_header(path, shape=None):
    """Cheap check of one cached file without reading its data (memory-mapped): a tensor of the
    right shape."""
    try:
        x = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise BadFeature(f"{path}: unreadable feature file ({type(e).__name__}: {e})") from None
    _check_shape(x, path, shape)


class DamagedManifest(UserError):
    """manifest.json exists but is not a JSON object (truncated by a full disk, edited by hand)."""


def read_manifest(cache_dir):
    """The manifest as a dict ({} when there is none); a damaged one is a DamagedManifest naming the
    way back: the sample log holds every extracted sample, and --rebuild_manifest rebuilds the
    manifest from it."""
    p = Path(cache_dir) / MANIFEST
    if not p.exists():
        return {}
    try:
        m = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        m = e
    if not isinstance(m, dict):
        raise DamagedManifest(
            f"{p} is damaged ({type(m).__name__}: {m}); rerun the extraction into "
            f"'{cache_dir}' (it rebuilds the manifest from the sample log, {SAMPLE_LOG})"
        )
    return m


@dataclass(frozen=True)
class EncoderRecord:
    """The manifest's encoder: what made the features, with the legacy defaults in one place (caches
    from before --layer hold the tower's output; before image_size was recorded, 448)."""

    model: str | None = None
    family: str | None = None
    revision: str | None = None
    dtype: str | None = None
    image_size: object = 448  # one int (square) or [W, H]
    cell: int | None = None  # pixels per token side
    grid: list | None = None  # [rows H, columns W] of the token grid
    feature_dim: int | None = None
    layer: str = "merger"

    @property
    def size(self):
        """(W, H) in pixels that the images were resized to."""
        v = self.image_size
        return (v, v) if isinstance(v, int) else tuple(v)


@dataclass(frozen=True)
class SampleRecord:
    """What the source said of one extracted sample; fields: every field as recorded (--group_by
    reads any of them)."""

    id: str | None = None
    image_id: str | None = None
    question: str | None = None
    answers: tuple = ()
    bbox: list | None = None  # [x, y, w, h] in the original image's pixels
    image_size: list | None = None  # the original image's (W, H)
    fingerprint: str | None = None
    fields: dict = field(default_factory=dict)


def known(cls, d):
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass(frozen=True)
class Manifest:
    """A cache's manifest.json, read (load_manifest): the one record of T, D and the token grid."""

    cache_dir: Path
    encoder: EncoderRecord
    source_kind: str | None
    source_path: str | None  # the images' folder / parquet shards / JSONL list
    samples: dict  # {index: SampleRecord} of every extracted sample
    failed: dict  # {index: why}
    codec: dict | None  # a compressed cache (compress.py): its codec, rank and measured quality

    @classmethod
    def from_dict(cls, m, cache_dir):
        enc, src = m.get("encoder") or {}, m.get("source") or {}
        samples = {
            int(i): SampleRecord(
                **{
                    **known(SampleRecord, r),
                    "answers": tuple(r.get("answers") or ()),
                    "fields": dict(r),
                }
            )
            for i, r in m.get("samples", {}).items()
        }
        return cls(
            Path(cache_dir),
            EncoderRecord(**known(EncoderRecord, enc)),
            src.get("kind"),
            src.get("path"),
            samples,
            {int(i): why for i, why in m.get("failed", {}).items()},
            m.get("codec"),
        )

    @property
    def grid(self):
        """(rows H, columns W) of the token grid: token t sits at row t // W, column t % W."""
        if self.encoder.grid is None or self.encoder.feature_dim is None:
            raise UserError(
                f"{self.cache_dir / MANIFEST} records no token grid / feature dim: re-extract with "
                "--rebuild_manifest"
            )
        return tuple(self.encoder.grid)

    @property
    def shape(self):
        """(tokens T, dim D) of the features."""
        h, w = self.grid
        return h * w, self.encoder.feature_dim

    @property
    def synthetic(self):
        return self.source_kind == "synthetic" or self.encoder.family == "synthetic"

    def sample(self, i):
        return self.samples.get(int(i), SampleRecord())


def info_size(info):
    """(W, H) from an encoder record written as a dict (extraction's encoder info)."""
    return EncoderRecord(**known(EncoderRecord, info)).size


def load_manifest(cache_dir):
    """The cache's Manifest; a missing folder or manifest is refused with the command that builds
    it."""
    if not Path(cache_dir).is_dir():
        raise UserError(
            f"feature cache directory '{cache_dir}' does not exist. Build it with: "
            + extract_command(cache_dir)
        )
    if not (Path(cache_dir) / MANIFEST).exists():
        raise UserError(
            f"'{cache_dir}' is not a feature cache ({MANIFEST} missing). Build it with: "
            + extract_command(cache_dir)
        )
    return Manifest.from_dict(read_manifest(cache_dir), cache_dir)


def read_sample_log(cache_dir):
    """{index: record} from samples.jsonl (later lines win; a torn line from a kill, closed by the
    next writer, is skipped: jsonl.py)."""
    out = {}
    for line in complete_text(Path(cache_dir) / SAMPLE_LOG)[0].splitlines():
        try:
            rec = json.loads(line)
            out[int(rec["i"])] = rec
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return out


def append_sample_log(cache_dir, records):
    append_lines(Path(cache_dir) / SAMPLE_LOG, records)


def key_string(info):
    return "|".join(str(info.get(k)) for k in ("model", "revision", "dtype", "image_size"))


def check_compatible(manifest, encoder_info, source_info, cache_dir):
    old = manifest.get("encoder", {})
    # caches from before --layer hold the tower's output
    old = {"layer": EncoderRecord.layer, **old} if old else old
    diff = {k: (old.get(k), v) for k, v in encoder_info.items() if k in old and old.get(k) != v}
    if diff:
        raise UserError(
            f"cache '{cache_dir}' was made by another encoder: "
            + ", ".join(f"{k}: cache has {a!r}, this run {b!r}" for k, (a, b) in diff.items())
            + ". Use another --cache_dir (or delete this one)."
        )
    src = manifest.get("source", {})
    if src and source_info and src.get("kind") != source_info["kind"]:
        raise UserError(
            f"cache '{cache_dir}' was made from another source ({src.get('kind')} at "
            f"{src.get('path')}); this run reads {source_info['kind']} at {source_info['path']}. "
            f"Use another --cache_dir."
        )


def merge_into_manifest(cache_dir, info, source_info, done=(), failed=None, log=None):
    """Under the cache lock: read manifest.json as it is now, add this process's done samples {i:
    meta} and failures {i: reason} (and records of the sample log whose features exist), write it
    back atomically."""
    with cache_lock(cache_dir):
        m = read_manifest(cache_dir)
        m["encoder"], m["source"] = info, source_info
        samples = {int(k): v for k, v in m.get("samples", {}).items()}
        fails = {int(k): v for k, v in m.get("failed", {}).items()}
        # recovery: samples written by a killed run, or --rebuild_manifest
        for i, rec in (log or {}).items():
            if (
                i not in samples
                and rec.get("encoder") == key_string(info)
                and feature_path(cache_dir, i).exists()
            ):
                samples[i] = {k: v for k, v in rec.items() if k not in ("i", "encoder")}
                fails.pop(i, None)
        for i, meta in dict(done).items():
            samples[i] = meta
            fails.pop(i, None)
        for i, why in (failed or {}).items():
            fails[i] = why
            samples.pop(i, None)
        m["samples"] = {str(k): samples[k] for k in sorted(samples)}
        m["failed"] = {str(k): fails[k] for k in sorted(fails)}
        atomic_save(m, Path(cache_dir) / MANIFEST)
        return m


NORMALIZATIONS = ("layernorm", "none")


def normalize(x, mode="layernorm"):
    """The one normalisation used everywhere: layer norm over the D feature dims, no affine (eps
    1e-5)."""
    if mode == "layernorm":
        return F.layer_norm(x, x.shape[-1:])
    if mode == "none":
        return x
    raise ValueError(f"unknown normalisation '{mode}' (choose from {NORMALIZATIONS})")


def denormalize(xn, x, mode="layernorm"):
    """normalize's inverse for features xn made from x: each token's own mean and standard deviation
    restored."""
    if mode == "layernorm":
        return xn * (x.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt() + x.mean(
            -1, keepdim=True
        )
    return normalize(xn, mode)


def cached_indices(cache_dir, manifest=None):
    """Sorted indices of the samples whose features the manifest lists as extracted."""
    m = manifest or load_manifest(cache_dir)
    idx = sorted(i for i in m.samples if feature_path(cache_dir, i).exists())
    if not idx:
        raise UserError(
            f"the feature cache '{cache_dir}' is empty. Build it with: "
            + extract_command(cache_dir)
        )
    return idx


def cache_grid(cache_dir, manifest=None):
    return (manifest or load_manifest(cache_dir)).grid


def cached_shape(cache_dir, manifest=None):
    """(tokens T, dim D) of a cache's features, from its manifest: the one source of the feature
    shape."""
    return (manifest or load_manifest(cache_dir)).shape


def cache_image_size(cache_dir):
    """(W, H) in pixels that the cache's images were resized to."""
    return load_manifest(cache_dir).encoder.size


def answer_box_masks(cache_dir, indices):
    """{index: bool [T] mask of the tokens overlapping the sample's answer box, or None (no bbox, no
    original image size, or a box outside the image)}; the box is scaled from the original image to
    the cache's image size."""
    m = load_manifest(cache_dir)
    out = {}
    for i in indices:
        s = m.sample(i)
        ok = s.bbox and s.image_size and len(s.bbox) == 4
        out[i] = box_mask(s.bbox, s.image_size, m.grid, m.encoder.size) if ok else None
    return out


def lossy_note(cache_dir):
    """'' for a cache of encoder features; for a compressed cache (compress.py) a note every report
    prints: the codec and its measured cosine to the source features."""
    c = read_manifest(cache_dir).get("codec")
    if not c:
        return ""
    return (
        f" [LOSSY: compressed cache, codec {c['name']}{' rank ' + str(c['rank']) if c.get('rank') else ''}, "
        f"cosine to the source {c['cosine_mean']:.5f} ± {c['cosine_std']:.5f}]"
    )
