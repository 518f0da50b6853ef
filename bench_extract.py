"""
Feature-extraction throughput: images per second of preprocessing and of the vision tower, at several batch sizes.

    python bench_extract.py --model random-3b --device cuda --batch_sizes 8,32      (real size, random weights)
    python bench_extract.py --model tiny-random --batch_sizes 1,8,32
"""
import argparse
import time

import torch

import demo_data
import qwenvl_dataloader as qd

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--model", default=qd.RANDOM_3B, help="tiny-random, random-3b, a hub id or a checkpoint dir")
ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
ap.add_argument("--dtype", default=None, help="default bf16 on CUDA, fp32 on CPU")
ap.add_argument("--batch_sizes", default="1,8")
ap.add_argument("--repeats", type=int, default=3)
args = ap.parse_args()
dev = torch.device(args.device)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

enc = qd.Encoder(args.model, dev, args.dtype)
params = sum(p.numel() for p in enc.tower.parameters())
rows = demo_data.make_rows(max(int(b) for b in args.batch_sizes.split(",")), seed=0)
images = [qd.load_image(r["image"]["bytes"]) for r in rows]
print(f"{args.model}: {params / 1e6:.1f}M parameters, {enc.info['dtype']} on {dev}, threads {torch.get_num_threads()}")
print(f"{'batch':>6}{'preprocess img/s':>18}{'tower img/s':>14}{'both img/s':>12}")
for b in (int(b) for b in args.batch_sizes.split(",")):
    ims = images[:b]
    enc(ims)  # warm-up
    t_pre, t_fwd = [], []
    with torch.no_grad():
        for _ in range(args.repeats):
            t = time.perf_counter()
            inputs = enc.processor(images=ims, return_tensors="pt")
            t_pre.append(time.perf_counter() - t)
            pv, grid = inputs["pixel_values"].to(dev, enc.dtype), inputs["image_grid_thw"].to(dev)
            sync()
            t = time.perf_counter()
            enc.tower(pv, grid_thw=grid)
            sync()
            t_fwd.append(time.perf_counter() - t)
    pre, fwd = min(t_pre), min(t_fwd)
    print(f"{b:>6}{b / pre:>18.1f}{b / fwd:>14.2f}{b / (pre + fwd):>12.2f}")
if dev.type == "cuda":
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
