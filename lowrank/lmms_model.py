"""
The toolkit's Qwen-VL (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) as an lmms-eval model: lmms-eval's tasks
give the prompt, the generation settings and the scoring; the model answers with one vision-token
transform (transforms.py) applied where the tower's output enters the language model. lmms-eval is
optional: without it this module imports, and LowRankQwen says how to install it.

lmms-eval's own Qwen2.5-VL wrapper is not wrapped: its module imports decord and qwen-vl-utils,
which need torchvision, and torchvision does not import beside the CPU torch build this toolkit is
tested with. The model interface (`lmms_eval.api.model.lmms`: generate_until) is implemented here
instead, on the same chat template, processor and greedy decoding as vqa_eval.py.
"""

from dataclasses import replace

import torch

from lowrank.cli import UserError
from lowrank.downstream import Asker, Decoding, Item
from lowrank.images import load_image, parse_image_size
from lowrank.transforms import TokenSetup, parse_spec
from lowrank.vlm import decode_answer, load_vlm

try:
    from lmms_eval.api.model import lmms as LmmsModel
except ImportError:  # optional: the rest of the toolkit works without it
    LmmsModel = object

INSTALL = (
    "pip install -r requirements-lmms-deps.txt && pip install --no-deps -r requirements-lmms.txt"
)


def lmms_eval_models():
    """lmms-eval's entry point (pyproject.toml, group lmms_eval.models): after `pip install
    --no-deps -e .`, `python -m lmms_eval --model lowrank_qwen --model_args
    pretrained=tiny-random,transform=svd:64,image_size=448 ...` loads LowRankQwen."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id="lowrank_qwen", simple_class_path="lowrank.lmms_model.LowRankQwen"
    )


class LowRankQwen(LmmsModel):
    """pretrained: a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint (directory or hub id) or one built
    in code (vlm.RANDOM_TEXT); transform: a spec such as svd:64. The keyword arguments are
    lmms-eval's model_args and its command line's (strings or numbers there): image_size, the size
    the features were made at (448, '448x448' or (W, H)); setup, from Python only: a
    transforms.TokenSetup of a training run (normalisation, token grid, factoriser, bases: for
    nn:r, keep:lrcp:k and codec transforms; lmms_eval_lowrank.py), by default layernorm on the
    image's own grid."""

    def __init__(
        self,
        pretrained,
        transform="original",
        *,
        device="cpu",
        dtype=torch.float32,
        image_size=448,
        max_new_tokens=16,
        seed=0,
        batch_size=1,
        setup=None,
    ):
        if LmmsModel is object:
            raise UserError(f"lmms-eval is not installed: {INSTALL}")
        super().__init__()
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        sized = isinstance(image_size, (tuple, list))
        self.size = tuple(image_size) if sized else parse_image_size(str(image_size))
        self.spec, self.max_new_tokens = parse_spec(transform), int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.model, self.proc = load_vlm(pretrained, torch.device(device), dtype, self.size)
        if setup is None:
            vision = self.model.config.vision_config
            cell = vision.patch_size * vision.spatial_merge_size
            setup = TokenSetup("layernorm", (self.size[1] // cell, self.size[0] // cell))
        setup = replace(setup, max_svd=self.spec.rank if self.spec.kind == "svd" else 0)
        # lmms-eval's context is already the whole user turn
        decoding = Decoding(
            prompt=lambda context: context, max_new_tokens=max_new_tokens, seed=seed
        )
        self.asker = Asker(self.model, self.proc, dtype, setup, decoding)

    def generate_until(self, requests):
        """One greedy answer per request, batch_size requests at a time, cut at the task's stop
        strings. A batch decodes to its longest max_new_tokens and each answer keeps its own first
        max_new_tokens (greedy decoding: the same tokens); the answer is a function of (document,
        transform, seed) alone, as in vqa_eval.py."""
        out = []
        for b in range(0, len(requests), self.batch_size):
            items, limits, stops = [], [], []
            for req in requests[b : b + self.batch_size]:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                visuals = doc_to_visual(self.task_dict[task][split][doc_id])
                if len(visuals) != 1:
                    raise UserError(
                        f"{task}: document {doc_id} has {len(visuals)} images; this model takes one"
                    )
                items.append(Item(doc_id, load_image(visuals[0], self.size), context, [self.spec]))
                limits.append(int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)))
                until = gen_kwargs.get("until") or []
                stops.append([until] if isinstance(until, str) else until)
            self.asker.decoding = replace(self.asker.decoding, max_new_tokens=max(limits))
            for rec, limit, until in zip(self.asker.ask(items), limits, stops):
                answer = decode_answer(self.proc, rec["tokens"][:limit])
                for stop in until:
                    answer = answer.split(stop)[0]
                out.append(answer)
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError("LowRankQwen answers generation tasks only")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("LowRankQwen answers single-round tasks only")
