"""
Downstream scoring and conditions: the VQA accuracy of an answer, the conditions a run asks
(original, zeros, truncated SVD, the factoriser, kept tokens) and the vision tokens each condition
gives the model, and the report over a run's answers.
"""

import copy
import hashlib
import json
import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from PIL import Image

from lowrank.cli import UserError
from lowrank.dataset import principal_basis
from lowrank.encoders import attention_received, deepstack_of, pruned_tower, repeated_cells
from lowrank.feature_codecs import family
from lowrank.lm_cost import kv_bytes, prefill_flops, tower_flops
from lowrank.metrics import timed
from lowrank.runs import omega_basis
from lowrank.selection import QUESTION_RULES, relevance
from lowrank.transforms import Spec, Tower, check_spec
from lowrank.vlm import FastV, decode_answer, greedy, mrope_positions, prompt_embeds
from lowrank.vqa_score import normalize_answer, top_answer_match, vqa_accuracy

# lmms-eval's TextVQA protocol for qwen2_5_vl (its task's default kwargs): the image first, then the
# question with str.capitalize() applied (first letter upper, the rest lower) and this line after it
PROMPT = "{question}\nAnswer the question using a single word or phrase."
QUESTION_TRANSFORMS = {"capitalize": str.capitalize, "none": lambda q: q}

# --------------------------------------------------------------------------------------------------
# conditions


def check_prompt(prompt):
    """--prompt must name {question}, and only it."""
    if "{question}" not in prompt:
        raise UserError(f"--prompt {prompt!r}: name {{question}} where the question goes")
    try:
        prompt.format(question="")
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(
            f"--prompt {prompt!r}: only {{question}} can be filled in ({type(e).__name__}: {e}); write "
            f"a literal brace as {{{{ or }}}}"
        ) from None


def fit_bases(conds, lrcp_rank, results_dir, cache, train_idx, norm):
    """The bases the asked transforms need: lrcp's (--lrcp_rank principal directions of the training
    split), the PCA codecs' (all of them), the omega codecs' (the subspace model's Ω)."""
    needs = {s.rule for s in conds if s.kind == "keep"} | {
        family(s.codec) for s in conds if s.kind == "codec"
    }
    bases = {}
    if needs & {"lrcp", "pca"}:
        P = principal_basis(cache, train_idx, norm)
        bases.update({"lrcp": P[:, :lrcp_rank], "pca": P.float()})
    omega = omega_basis(results_dir) if "omega" in needs else None
    if omega is not None:
        bases["omega"] = omega
    return bases


def check_conditions(conds, arch, nn_rank, hw, dim, bases):
    """Every transform's rank or k within what the run's model and the cache's features allow,
    before any work."""
    for spec in conds:
        check_spec(
            spec,
            hw[0] * hw[1],
            dim,
            nn_rank=nn_rank,
            nested=arch != "symmetric",
            bases=bases,
            hw=hw,
        )


def eos_ids(model, tokenizer):
    """Every id that ends an answer: the model config's, the tokenizer's, and all of the generation
    config's (Qwen's lists two)."""
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id}
    return (ids | set(gen if isinstance(gen, (list, tuple)) else [gen])) - {None}


def default_batch_size(device):
    """Samples answered together when --batch_size is not given: a GPU's worth, or a CPU's."""
    return 32 if device.type == "cuda" else 8


def draw_seed(seed, sample, condition):
    """A seed for one (run seed, sample, condition): random draws never depend on what was asked
    before."""
    return int.from_bytes(
        hashlib.sha256(json.dumps([seed, sample, condition]).encode()).digest()[:8], "little"
    )


@dataclass(frozen=True)
class Decoding:
    """How a question becomes an answer: prompt maps the question to the user turn's text after
    the image; seed feeds the random rule's draws (draw_seed)."""

    prompt: Callable
    max_new_tokens: int = 16
    seed: int = 0


def resized_processor(proc, size):
    """A copy of the model's processor whose image processor is fixed to size (W, H) pixels, as
    encoders.image_processor fixes the original (min_pixels = max_pixels = W·H)."""
    ip, pixels = copy.deepcopy(proc.image_processor), size[0] * size[1]
    ip.size = {"shortest_edge": pixels, "longest_edge": pixels}
    if hasattr(ip, "min_pixels"):  # transformers 4.x reads these, 5.x only size
        ip.min_pixels = ip.max_pixels = pixels
    out = copy.copy(proc)
    out.image_processor = ip
    return out


# the conditions that act on the image, before the tower: each has its own tower run
ON_THE_IMAGE = ("resize", "pixelprune")


@dataclass
class Item:
    """One sample to ask about: its index, its image (PIL, at the cache's size), its question, and
    the conditions (transforms.Spec) it still needs."""

    sample: int
    image: Image.Image
    question: str
    specs: list


@dataclass
class Encoded:
    """One image and question, ready for every transform: the prompt's ids and M-RoPE positions,
    the tower's tokens (transforms.Tower), what running the tower took (ms) and cost (FLOPs); for
    pixelprune, which tokens the tower made and what finding them took."""

    ids: torch.Tensor
    positions: torch.Tensor
    tower: Tower
    tower_ms: float
    tower_flops: int
    # pixelprune: the image tokens the tower made (the others leave), and finding the repeats
    kept: torch.Tensor | None = None
    transform_ms: float = 0.0


class Asker:
    """Asks the model questions about images under each transform, a batch of samples at a time: the
    vision tower runs once per sample, the SVD at the largest rank is taken once and truncated for
    the smaller ones (transforms.Tower), and each condition answers the whole batch in one greedy
    decoding."""

    def __init__(self, model, proc, dtype, setup, decoding):
        self.model, self.proc, self.dtype, self.decoding = model, proc, dtype, decoding
        self.dev = next(model.parameters()).device
        if setup.nn_model is not None:
            setup = replace(setup, nn_model=setup.nn_model.to(self.dev))
        self.setup = setup
        self.img_id, self.eos = model.config.image_token_id, eos_ids(model, proc.tokenizer)
        self.text_config = getattr(model.config, "text_config", model.config)
        self.resized = {}  # (W, H) -> the processor fixed to it (resize conditions)

    def encode(
        self, image, question, *, attention=False, question_aware=False, size=None, prune=None
    ):
        """-> Encoded (prompt ids, M-RoPE positions, transforms.Tower of the image's vision tokens,
        the tower's ms and FLOPs); attention: also the attention each token receives in the tower
        (for visionzip; its recomputation counts in the tower ms); question_aware: each token's
        relevance to the question's token embeddings (selection.QUESTION_RULES); size: the image's
        (W, H) when resize changed it (the processor is fixed to one size: a copy fixed to this
        one); prune: pixelprune's tolerance: the tower runs on the cells that do not repeat
        (encoders.repeated_cells, timed as the transform; encoders.pruned_tower)."""
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": self.decoding.prompt(question)},
                ],
            }
        ]
        text = self.proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if size is not None and size not in self.resized:
            self.resized[size] = resized_processor(self.proc, size)
        proc = self.proc if size is None else self.resized[size]
        inputs = proc(text=[text], images=[image], return_tensors="pt")
        ids = inputs["input_ids"][0].to(self.dev)
        vision = self.model.config.vision_config
        merge = vision.spatial_merge_size
        keep, prune_s = None, 0.0
        if prune is not None:
            keep, prune_s = timed(repeated_cells, image, vision.patch_size * merge, prune)
        pixels = inputs["pixel_values"].to(self.dev, self.dtype)
        grid = inputs["image_grid_thw"].to(self.dev)
        V, att, deepstack, secs = self.run_tower(pixels, grid, keep, attention)
        setup = self.setup
        hw = tuple(int(v) // merge for v in inputs["image_grid_thw"][0, 1:])
        positions = mrope_positions(ids.cpu(), self.img_id, hw)
        tower = Tower(
            V.float(),
            replace(setup, hw=hw),  # resize: the resized image's grid
            attention=att,
            deepstack=None if deepstack is None else deepstack.float(),
        )
        # the question alone, as the tokenizer splits it, in the model's own embedding table
        if question_aware:
            q_ids = self.proc.tokenizer(question, add_special_tokens=False)["input_ids"]
            Q = self.model.get_input_embeddings().weight[torch.tensor(q_ids, device=self.dev)]
            tower.relevance = relevance(V.float(), Q.float())
        flops = tower_flops(vision, tuple(grid[0].tolist()), keep)
        kept = None if keep is None else keep.nonzero().squeeze(1)
        return Encoded(ids, positions, tower, secs * 1e3, flops, kept, prune_s * 1e3)

    @torch.no_grad()
    def run_tower(self, pixels, grid, keep, attention):
        """-> (tokens [T, D], the attention each receives or None, deepstack features or None,
        seconds): the tower on the kept cells only (pixelprune), or on every cell, with the
        attention visionzip needs."""
        visual, seen = self.model.model.visual, {}
        # the tower's whole output, whichever way it runs: Qwen3-VL's deepstack features are in it
        hook = visual.register_forward_hook(lambda module, args, out: seen.update(out=out))
        try:
            if keep is not None:
                V, secs = timed(pruned_tower, visual, pixels, grid, keep, device=self.dev)
                V, att = V.pooler_output, None
            elif attention:
                (V, att), secs = timed(attention_received, visual, pixels, grid, device=self.dev)
                att = att[0]
            else:
                V, secs = timed(lambda: visual(pixels, grid_thw=grid), device=self.dev)
                V, att = getattr(V, "pooler_output", V), None
        finally:
            hook.remove()
        return V, att, deepstack_of(seen["out"]), secs

    def ask(self, items):
        """items: [Item] -> one record per (sample, spec), yielded a
        condition at a time (one batch: every item that asks it; fastv one item at a time): the
        answer, its token ids and the cost (vision and prompt tokens, prefill FLOPs and KV-cache
        bytes from the config, the transform's ms, the batch's prefill ms and median ms per decoding
        step, peak CUDA memory). Every answer is a function of (sample, condition, seed) alone: the
        random rule draws from a generator seeded by all three, so a resumed run answers as an
        uninterrupted one."""
        asked = [s for it in items for s in it.specs]
        attention = any(s.rule == "visionzip" for s in asked)
        aware = any(s.rule in QUESTION_RULES for s in asked)
        # the tower on the image as it is, for the samples that ask anything but ON_THE_IMAGE
        encoded = {
            it.sample: self.encode(it.image, it.question, attention=attention, question_aware=aware)
            for it in items
            if any(s.kind not in ON_THE_IMAGE for s in it.specs)
        }
        for spec in dict.fromkeys(asked):
            asking = [it for it in items if spec in it.specs]
            if spec.kind == "resize":  # the image itself smaller: its own tower run and prompt
                group = [
                    (
                        it.sample,
                        self.encode(
                            it.image.resize(spec.size, Image.BICUBIC), it.question, size=spec.size
                        ),
                    )
                    for it in asking
                ]
            elif spec.kind == "pixelprune":  # the tower on the cells that do not repeat
                group = [
                    (it.sample, self.encode(it.image, it.question, prune=spec.tolerance))
                    for it in asking
                ]
            else:
                group = [(it.sample, encoded[it.sample]) for it in asking]
            if spec.kind == "fastv":
                self.check_fastv(spec)
            for batch in [[e] for e in group] if spec.kind == "fastv" else [group]:
                yield from self.answer_batch(spec, batch)

    def check_fastv(self, spec):
        """FastV's K within the language model; on Qwen3-VL past the layers that add the deepstack
        features to the image tokens (they expect every image token)."""
        layers = self.text_config.num_hidden_layers
        if spec.layer >= layers:
            raise UserError(f"transform {spec}: the model has {layers} layers")
        levels = len(
            getattr(self.model.config.vision_config, "deepstack_visual_indexes", None) or []
        )
        if spec.layer < levels:
            raise UserError(
                f"transform {spec}: the deepstack features are added to every image token after "
                f"layers 0..{levels - 1}; K must be at least {levels}"
            )

    def answer_batch(self, spec, group):
        """group: [(sample, Encoded)] -> one record per sample."""
        prompts, made = [], []
        for sample, e in group:
            gen = torch.Generator().manual_seed(draw_seed(self.decoding.seed, sample, str(spec)))
            applied = Spec("original") if spec.kind in ON_THE_IMAGE else spec  # done in encode
            with torch.no_grad():
                out, secs = timed(e.tower.apply, applied, gen, device=self.dev)
            kept = out.kept if e.kept is None else e.kept
            prompts.append(
                prompt_embeds(
                    self.model,
                    e.ids,
                    e.positions,
                    out.tokens,
                    kept,
                    self.img_id,
                    deepstack=out.deepstack,
                )
            )
            n_vision = len(out.tokens) if spec.kind != "fastv" else spec.k
            made.append((n_vision, secs * 1e3 + e.transform_ms))
        fastv = None
        if spec.kind == "fastv":
            ids = group[0][1].ids
            fastv = FastV(spec.layer, spec.k, (ids == self.img_id).nonzero().squeeze(1))
        cuda = self.dev.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)
        outs, times = greedy(self.model, prompts, self.decoding.max_new_tokens, self.eos, fastv)
        peak = torch.cuda.max_memory_allocated(self.dev) / 2**20 if cuda else None
        for (sample, enc), prompt, toks, (n_vision, transform_ms) in zip(
            group, prompts, outs, made
        ):
            n = len(prompt)
            pruned = (spec.layer, n - len(fastv.image_positions) + spec.k) if fastv else None
            llm_flops = prefill_flops(self.text_config, n, pruned)
            yield {
                "sample": sample,
                "condition": str(spec),
                "answer": decode_answer(self.proc, toks),
                "tokens": toks,
                "vision_tokens": n_vision,
                "prompt_tokens": n,
                "prefill_flops": llm_flops,
                "tower_flops": enc.tower_flops,
                "total_flops": enc.tower_flops + llm_flops,
                "kv_bytes": kv_bytes(self.text_config, n, self.dtype.itemsize, pruned),
                "tower_ms": enc.tower_ms,
                "transform_ms": transform_ms,
                "batch": len(group),
                "prefill_ms": times["prefill_s"] * 1e3,
                "decode_ms": times["decode_s"] * 1e3 if times["decode_s"] is not None else None,
                "generate_ms": times["total_s"] * 1e3,
                "peak_mib": peak,
            }


def consistency(agrees):
    """The share of answers that equal the original tokens' answer once normalised (benchmarks'
    consistency), with its standard error over the samples."""
    n, p = len(agrees), sum(agrees) / len(agrees)
    se = (sum((float(a) - p) ** 2 for a in agrees) / (n - 1) / n) ** 0.5 if n > 1 else float("nan")
    return {"consistency": p, "consistency_se": se}


RIGHT = 0.5  # an answer is right when its lmms-eval score (TextVQA's accuracy) is at least this


def mcnemar_exact(b, c):
    """McNemar's exact two-sided p-value for b discordant pairs one way and c the other: the
    binomial test of min(b, c) successes in b + c trials at p = 1/2 (1 when there is no discordant
    pair)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def flips(acc, base):
    """Answers that went right -> wrong and wrong -> right against the original tokens' (right:
    score >= RIGHT), counted and as shares of the samples, with McNemar's exact p-value of the
    difference."""
    r2w = sum(a < RIGHT <= o for a, o in zip(acc, base))
    w2r = sum(o < RIGHT <= a for a, o in zip(acc, base))
    n = max(len(acc), 1)
    return {
        "right_to_wrong": r2w,
        "wrong_to_right": w2r,
        "right_to_wrong_share": r2w / n,
        "wrong_to_right_share": w2r / n,
        "flips_p": mcnemar_exact(r2w, w2r),
    }


def bootstrap(acc, base, draws=1000, seed=0):
    """95 % percentile intervals of the accuracy and of its paired change against the original, over
    `draws` resamples of the samples (a fixed seed: the same answers give the same interval)."""
    acc, diff = (
        np.asarray(acc, dtype=float),
        np.asarray(acc, dtype=float) - np.asarray(base, dtype=float),
    )
    pick = np.random.default_rng(seed).integers(0, len(acc), (draws, len(acc)))

    def ci(v):
        return [float(q) for q in np.percentile(v[pick].mean(1), [2.5, 97.5])]

    return {"vqa_acc_ci95": ci(acc), "delta_ci95": ci(diff)}


def score(idx, conds, done, samples, stored=None, tokens=None):
    """Every answer scored against the references -> (one row per sample, one summary per
    condition). The change against the original tokens is paired (the same questions), with its
    standard error over the samples and a bootstrap interval; consistency is the agreement with the
    original tokens' answer. The cost columns summarise the answers' records (Asker.ask); stored:
    {condition: bytes per image} (transforms.stored_bytes); tokens: the image's vision tokens, so a
    k is also recorded as a share of them; samples: {index: feature_cache.SampleRecord}."""
    names = [str(s) for s in conds]
    per_sample = []
    for i in idx:
        refs = list(samples[i].answers)
        row = {"sample": i, "id": samples[i].id, "question": samples[i].question, "answers": refs}
        for n in names:
            a = done[(i, n)]["answer"]
            row[n] = {
                "answer": a,
                "vqa_acc": vqa_accuracy(a, refs),
                "top_answer": top_answer_match(a, refs),
                "changed": a != done[(i, "original")]["answer"],
                "consistent": normalize_answer(a)
                == normalize_answer(done[(i, "original")]["answer"]),
            }
        per_sample.append(row)
    # a sample without reference answers has no accuracy
    scored = [r for r in per_sample if r["answers"]]
    if not scored:
        raise UserError(
            f"none of the {len(per_sample)} samples has reference answers: nothing to score"
        )
    summary, N = [], len(scored)
    base = sum(r["original"]["vqa_acc"] for r in scored) / N
    for spec in conds:
        n = str(spec)
        acc = sum(r[n]["vqa_acc"] for r in scored) / N
        d = [r[n]["vqa_acc"] - r["original"]["vqa_acc"] for r in scored]
        se = (sum((x - acc + base) ** 2 for x in d) / (N - 1) / N) ** 0.5 if N > 1 else float("nan")
        spent = cost([done[(i, n)] for i in idx])
        kept = spent["vision_tokens"] if spec.kind in ON_THE_IMAGE else spec.k
        summary.append(
            {
                "condition": n,
                "kind": spec.kind,
                "value": spec.rank
                if spec.k is None
                else spec.k,  # the rank r, or the kept tokens k
                "share": kept / tokens
                if tokens and spec.kind in ("keep", "merge", "fastv", *ON_THE_IMAGE)
                else None,
                "size": list(spec.size) if spec.size else None,  # resize: the image's (W, H)
                "rule": spec.rule,
                "codec": spec.codec,
                "layer": spec.layer,
                "n": N,
                "n_without_answers": len(per_sample) - N,
                "vqa_acc": acc,
                "delta": acc - base,
                "delta_se": se,
                "top_answer": sum(r[n]["top_answer"] for r in scored) / N,
                "changed": sum(r[n]["changed"] for r in per_sample) / len(per_sample),
                **consistency([r[n]["consistent"] for r in per_sample]),
                **bootstrap(
                    [r[n]["vqa_acc"] for r in scored], [r["original"]["vqa_acc"] for r in scored]
                ),
                **flips(
                    [r[n]["vqa_acc"] for r in scored], [r["original"]["vqa_acc"] for r in scored]
                ),
                **spent,
                "bytes_per_image": (stored or {}).get(n),
            }
        )
    return per_sample, summary


def cost(recs):
    """A condition's cost over its answers' records: medians of the token counts and times, means of
    the FLOPs and bytes; ms_per_sample is the condition's own time per answer (its transform, plus
    its batch's decoding shared by the batch)."""

    def med(v):
        return float(np.median(v)) if v else None

    peaks = [r["peak_mib"] for r in recs if r["peak_mib"] is not None]
    llm = float(np.mean([r["prefill_flops"] for r in recs]))
    # answers logged before the tower's cost was recorded have none
    towers = [r.get("tower_flops") for r in recs]
    tower = float(np.mean(towers)) if None not in towers else None
    return {
        "vision_tokens": med([r["vision_tokens"] for r in recs]),
        "prompt_tokens": med([r["prompt_tokens"] for r in recs]),
        "prefill_flops": llm,
        "tower_flops": tower,
        "total_flops": tower + llm if tower is not None else None,
        "tower_share": tower / (tower + llm) if tower is not None else None,
        "kv_bytes": float(np.mean([r["kv_bytes"] for r in recs])),
        "tower_ms": med([r["tower_ms"] for r in recs]),
        "batch_size": med([r["batch"] for r in recs]),
        "transform_ms": med([r["transform_ms"] for r in recs]),
        "prefill_ms": med([r["prefill_ms"] for r in recs]),
        "decode_ms_per_token": med([r["decode_ms"] for r in recs if r["decode_ms"] is not None]),
        "ms_per_sample": med([r["transform_ms"] + r["generate_ms"] / r["batch"] for r in recs]),
        "peak_gpu_mib": max(peaks) if peaks else None,
    }
