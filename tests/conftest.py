import pytest

import demo_data
import qwenvl_dataloader as qd


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A 40-image cache made by the tiny offline encoder from a TextVQA-schema parquet of real photos."""
    root = tmp_path_factory.mktemp("tiny_cache")
    demo_data.write_parquet(demo_data.make_rows(40, seed=3), root / "data", shards=2)
    qd.extract(root / "data", root / "cache", qd.TINY, "cpu", batch_size=8, progress=False)
    return root
