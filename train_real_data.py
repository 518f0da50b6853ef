"""
Train a low-rank factoriser X ≈ A·B on cached Qwen2.5-VL vision features.

    python train_real_data.py --batch_size 8 --epochs 20 --lr 0.001 --rank 128 --cache_dir feature_cache_real
    torchrun --nproc_per_node=4 train_real_data.py ...      (DDP; rank 0 logs and writes)

Writes into --results_dir: best_model.pt, last.pt, split.json, config.json, history.json,
loss_curves.png.
"""

from lowrank.cli import run_cli
from lowrank.training import get_args_parser, train


def main(argv=None):
    return train(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
