"""
A training run's configuration as one typed record, RunConfig: the flags that make a run, with their
defaults and help in one place (training's parser is built from these fields, so a new training flag
is one field here), and what training records beside them (the cache's shape, the split's
fingerprint). Stored in config.json and every checkpoint as a plain dict of plain types; read back
with RunConfig.from_dict, which fills what older runs did not record with the values they were made
with.
"""

from dataclasses import asdict, dataclass, field, fields

from lowrank.cli import UserError, nonneg_float, nonneg_int, positive_float, positive_int

# runs from before the shape was recorded were trained on Qwen2.5-VL-3B features at 448²
LEGACY_SHAPE = (256, 2048)


def flag(default, help, type=None, name=None, resumable=False):
    """A RunConfig field that is also a training flag: --<name or field name>, its type and help.
    resumable: may take another value on --resume (the others must equal the run's)."""
    return field(
        default=default, metadata=dict(help=help, type=type, flag=name, resumable=resumable)
    )


# per-arch options: flag -> (arch, help, type); stored in RunConfig.arch_options once resolved
ARCH_FLAGS = {
    "hidden": ("symmetric", "MLP hidden width", int),
    "power_iters": (
        "subspace",
        "power steps Q = orth(X Xᵀ Q) per sample at every rank (default: per rank, from the schedule)",
        int,
    ),
    "oversample": (
        "subspace",
        "extra columns in Ω at every rank, the best rank k then taken by an m x m eigendecomposition (default: "
        "per rank, from the schedule; --power_iters alone: 0)",
        int,
    ),
    "out_map": (
        "subspace",
        "1: learn a gain g [D] per feature, from 1, applied to B: X̂ = A·(B diag(g)), still a "
        "rank-r factorisation of each image (what a --tail_weight run uses to undo the shrinkage "
        "of the rebuilt tokens that the network's tail is sensitive to; a full D x D map overfits "
        "300 crops; it steps at 10x --lr); 0: none",
        int,
    ),
}


@dataclass(frozen=True)
class RunConfig:
    batch_size: int = flag(8, "training batch size (per process under torchrun)", positive_int)
    epochs: int = flag(
        20, "training epochs (epoch 0 = the starting point)", nonneg_int, resumable=True
    )
    lr: float = flag(0.001, "AdamW learning rate", nonneg_float)
    rank: int = flag(128, "rank r of the factorisation, 1..min(tokens, dim)", int)
    lambda_B: float = flag(0.0001, "weight of mean(B²)", nonneg_float)
    lambda_ortho: float = flag(0.001, "weight of ‖BBᵀ - I‖²_F / r²", nonneg_float)
    weight_decay: float = flag(0.00001, "AdamW weight decay", nonneg_float)
    patience: int = flag(
        10,
        "early stop after this many epochs without a better validation MSE",
        positive_int,
        resumable=True,
    )
    seed: int = flag(42, "split, initialisation and shuffling", int)
    arch: str = flag(
        "symmetric", "symmetric: the original's MLP network; subspace: learned subspace iteration"
    )
    cache_dir: str = flag("feature_cache_real", "the feature cache (qwenvl_dataloader.py)")
    normalization: str = flag(
        "layernorm",
        "layer norm over the feature dims (no affine), or none; stored in the checkpoint",
        name="normalize",
    )
    max_samples: int | None = flag(None, "use only the first N cached samples", positive_int)
    group_by: str = flag(
        "auto",
        "keep samples with the same value of this manifest field in one split: image_id (the source photo/image), "
        "fingerprint (identical image bytes), none; auto = image_id where the source has it, else fingerprint",
    )
    test_share: float = flag(
        0.1,
        "share of the samples (whole --group_by groups) in the test split; validation 0.1, training the rest (more "
        "test photos where there are few, e.g. 0.3 on vit_features.py's 19 photos)",
        positive_float,
    )
    grad_clip: float = flag(1.0, "gradient-norm clipping", positive_float)
    tail_weight: float = flag(
        0.0,
        "downstream objective on a vit_features.py block cache: the tokens rebuilt from A·B go "
        "through the shipped ViT's frozen tail (vit.Tail) and (1 - final-token cosine) + (1 - "
        "saliency Pearson r) against the unmodified network is added with this weight; the best "
        "epoch is then the one with the lowest validation objective; 0: reconstruction only",
        nonneg_float,
    )
    # recorded by training beside the flags
    # the arch's options, resolved (ARCH_FLAGS, model.ARCH_DEFAULTS)
    arch_options: dict = field(default_factory=dict)
    world_size: int = 1
    tokens: int = LEGACY_SHAPE[0]  # the cache's feature shape [tokens, dim] and token grid
    dim: int = LEGACY_SHAPE[1]
    grid: tuple | None = None
    # the split's fingerprint: a checkpoint is scored on the split it was trained on
    split_sha: str | None = None
    compressed: str | None = None  # compress.py's int8 / pruned checkpoints
    # keys of a config written by another version, kept as they were
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d, source="the config"):
        """A stored config -> RunConfig; keys it lacks take the values older runs were made with."""
        if not isinstance(d, dict):
            raise UserError(f"{source} is not a run configuration (expected a JSON object)")
        known = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("grid") is not None:
            kw["grid"] = tuple(kw["grid"])
        return cls(**kw, extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self):
        """Plain types for config.json and the checkpoint (weights_only=True loads them)."""
        d = asdict(self)
        d["grid"] = list(self.grid) if self.grid is not None else None
        return {**d.pop("extra"), **d}

    @property
    def shape(self):
        return self.tokens, self.dim


def flag_fields():
    """The RunConfig fields that are training flags: [(flag name, field)]."""
    return [
        (f.metadata.get("flag") or f.name, f) for f in fields(RunConfig) if "help" in f.metadata
    ]
