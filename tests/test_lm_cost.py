"""lowrank/lm_cost.py: the vision tower's FLOPs from its config alone equal torch's FLOP counter on
each tiny tower (Qwen2-VL, Qwen2.5-VL with its windows, Qwen3-VL with its deepstack mergers), at a
square and a non-square image."""

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from lowrank import encoders, lm_cost


@pytest.mark.parametrize(
    "model,size",
    [
        ("tiny-random", "448"),
        ("tiny-random", "448x224"),
        ("tiny-random", "420x252"),  # 15 x 9 cells: partial windows at the edges
        ("tiny-random-qwen2-vl", "448"),
        ("tiny-random-qwen3-vl", "448"),
    ],
)
def test_the_tower_formula_equals_torchs_flop_counter(model, size):
    enc = encoders.Encoder(model, "cpu", image_size=size)
    # eager attention: its matmuls are counted (sdpa's CPU kernel is not), each window its own
    enc.tower.set_attn_implementation("eager")
    inputs = enc.processor(images=[Image.new("RGB", enc.size, (120, 30, 200))], return_tensors="pt")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        enc.tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    grid = tuple(inputs["image_grid_thw"][0].tolist())
    assert lm_cost.tower_flops(enc.tower.config, grid) == counter.get_total_flops()


def test_windows_of_a_grid_that_does_not_divide():
    """Qwen2.5-VL's 4 x 4-cell windows on a 5 x 6-cell grid: a full window, and partial ones at the
    edges; every patch in exactly one window."""
    spans = lm_cost.window_spans((1, 10, 12), 2, 4)
    assert spans == [64, 32, 16, 8] and sum(spans) == 10 * 12


@pytest.mark.parametrize("model", ["tiny-random", "tiny-random-qwen2-vl", "tiny-random-qwen3-vl"])
def test_the_pruned_towers_flops_count_its_kept_cells(model):
    """pixelprune: the formula on the kept cells (Qwen2.5-VL's windows less the removed cells) equals
    torch's FLOP counter on the pruned tower, and is below the whole image's."""
    enc = encoders.Encoder(model, "cpu")
    enc.tower.set_attn_implementation("eager")
    inputs = enc.processor(images=[Image.new("RGB", enc.size, (120, 30, 200))], return_tensors="pt")
    cells = enc.grid[0] * enc.grid[1]
    keep = torch.rand(cells, generator=torch.Generator().manual_seed(0)) < 0.6
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encoders.pruned_tower(enc.tower, inputs["pixel_values"], inputs["image_grid_thw"], keep)
    grid = tuple(inputs["image_grid_thw"][0].tolist())
    assert lm_cost.tower_flops(enc.tower.config, grid, keep) == counter.get_total_flops()
    assert counter.get_total_flops() < lm_cost.tower_flops(enc.tower.config, grid)
