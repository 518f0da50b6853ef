import pytest

import demo_set
import encoders
import qwenvl_dataloader
import train_real_data


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A 40-image cache made by the tiny offline encoder from a TextVQA-schema parquet of real photos."""
    root = tmp_path_factory.mktemp("tiny_cache")
    demo_set.write_parquet(demo_set.make_rows(40, seed=3), root / "data", shards=2)
    qwenvl_dataloader.extract(root / "data", root / "cache", encoders.TINY, "cpu", batch_size=8, progress=False)
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
