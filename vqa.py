"""
Downstream scoring and conditions: the VQA accuracy of an answer, the conditions a run asks (original, zeros,
truncated SVD, the factoriser, kept tokens) and the vision tokens each condition gives the model, and the report
over a run's answers.
"""

import hashlib
import json

import numpy as np
import torch

from cli import UserError, parse_ints
from feature_codecs import family
from metrics import timed
from qwenvl_dataloader import principal_basis
from runs import omega_basis
from token_selection import RULES
from transforms import Spec, Tower, check_spec, parse_spec
from vlm import answer, mrope_positions
from vqa_score import normalize_answer, top_answer_match, vqa_accuracy

# lmms-eval's TextVQA protocol for qwen2_5_vl (its task's default kwargs): the image first, then the question with
# str.capitalize() applied (first letter upper, the rest lower) and this line after it
PROMPT = "{question}\nAnswer the question using a single word or phrase."
QUESTION_TRANSFORMS = {"capitalize": str.capitalize, "none": lambda q: q}

# ----------------------------------------------------------------------------------------------------------------
# conditions


def conditions(args, nn_rank, arch):
    """The transforms a run asks, in order (transforms.py specs): original, then --zeros, --svd_ranks, --nn_ranks,
    --rules x --keep, then --transforms; each once."""
    specs = [Spec("original")] + ([Spec("zeros")] if args.zeros else [])
    svd_ranks = parse_ints(args.svd_ranks, "--svd_ranks")
    specs += [Spec("svd", r) for r in svd_ranks]
    if nn_rank:
        auto = [r for r in svd_ranks if (r == nn_rank if arch == "symmetric" else r <= nn_rank)]
        specs += [Spec("nn", r) for r in (parse_ints(args.nn_ranks, "--nn_ranks") if args.nn_ranks != "auto" else auto)]
    rules = [r for r in args.rules.split(",") if r.strip()]
    for rule in rules:
        if rule not in RULES:
            raise UserError(f"--rules: unknown '{rule}'; choose from {', '.join(RULES)}")
    specs += [Spec("keep", k, rule=rule) for rule in rules for k in parse_ints(args.keep, "--keep")]
    specs += [parse_spec(t) for t in args.transforms.split(",") if t.strip()]
    return list(dict.fromkeys(specs))


def check_prompt(prompt):
    """--prompt may name only {question}."""
    try:
        prompt.format(question="")
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(
            f"--prompt {prompt!r}: only {{question}} can be filled in ({type(e).__name__}: {e}); write "
            f"a literal brace as {{{{ or }}}}"
        ) from None


def fit_bases(conds, lrcp_rank, results_dir, cache, train_idx, norm):
    """The bases the asked transforms need: lrcp's (--lrcp_rank principal directions of the training split), the
    PCA codecs' (all of them), the omega codecs' (the subspace model's Ω)."""
    needs = {s.rule for s in conds if s.kind == "keep"} | {family(s.codec) for s in conds if s.kind == "codec"}
    bases = {}
    if needs & {"lrcp", "pca"}:
        P = principal_basis(cache, train_idx, norm)
        bases.update({"lrcp": P[:, :lrcp_rank], "pca": P.float()})
    omega = omega_basis(results_dir) if "omega" in needs else None
    if omega is not None:
        bases["omega"] = omega
    return bases


def check_conditions(conds, arch, nn_rank, hw, dim, bases):
    """Every transform's rank or k within what the run's model and the cache's features allow, before any work."""
    for spec in conds:
        check_spec(spec, hw[0] * hw[1], dim, nn_rank, nested=arch != "symmetric", bases=bases)


def eos_ids(model, tokenizer):
    """Every id that ends an answer: the model config's, the tokenizer's, and all of the generation config's (Qwen's
    lists two)."""
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id}
    return (ids | set(gen if isinstance(gen, (list, tuple)) else [gen])) - {None}


def draw_seed(seed, sample, condition):
    """A seed for one (run seed, sample, condition): random draws never depend on what was asked before."""
    return int.from_bytes(hashlib.sha256(json.dumps([seed, sample, condition]).encode()).digest()[:8], "little")


class Asker:
    """Asks the model one question about one image under each transform. The vision tower runs once per sample;
    the SVD at the largest rank is taken once and truncated for the smaller ones (transforms.Tower)."""

    def __init__(self, model, proc, dtype, norm, hw, nn_model, bases, max_svd, seed, prompt, max_new_tokens):
        """bases: {'lrcp' | 'pca' | 'omega': [D, r]} for the rules and codecs that need one; prompt: question -> the
        user turn's text after the image."""
        self.model, self.proc, self.dtype, self.norm, self.hw = model, proc, dtype, norm, hw
        self.dev = next(model.parameters()).device
        self.nn_model = nn_model.to(self.dev) if nn_model is not None else None
        self.bases, self.max_svd, self.prompt, self.max_new_tokens = bases, max_svd, prompt, max_new_tokens
        self.seed = seed
        self.img_id, self.eos = model.config.image_token_id, eos_ids(model, proc.tokenizer)

    def ask(self, sample, image, question, conds):
        """Yield one record per condition: its answer, the answer's token ids, ms (the condition's tokens and the
        answer) and tower_ms (the shared run of the vision tower). Every answer is a function of (sample,
        condition, seed) alone: the random rule draws from a generator seeded by all three, so a resumed run
        answers as an uninterrupted one."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt(question)}]}]
        text = self.proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.proc(text=[text], images=[image], return_tensors="pt")
        ids = inputs["input_ids"][0].to(self.dev)
        with torch.no_grad():
            pixels, grid = inputs["pixel_values"].to(self.dev, self.dtype), inputs["image_grid_thw"].to(self.dev)
            V, secs = timed(lambda: self.model.model.visual(pixels, grid_thw=grid), device=self.dev)
            V = getattr(V, "pooler_output", V).float()
        positions = mrope_positions(ids.cpu(), self.img_id, self.hw)
        tower = Tower(V, self.norm, self.hw, self.nn_model, self.bases, self.max_svd)
        for spec in conds:

            def run():
                with torch.no_grad():
                    gen = torch.Generator().manual_seed(draw_seed(self.seed, sample, str(spec)))
                    Vc, kept = tower.apply(spec, gen)
                return answer(
                    self.model, self.proc, ids, positions, Vc, kept, self.img_id, self.max_new_tokens, self.eos
                )

            (text_out, toks), ms = timed(run, device=self.dev)
            yield {"condition": str(spec), "answer": text_out, "tokens": toks, "ms": ms * 1e3, "tower_ms": secs * 1e3}


def consistency(agrees):
    """The share of answers that equal the original tokens' answer once normalised (benchmarks' consistency), with
    its standard error over the samples."""
    n, p = len(agrees), sum(agrees) / len(agrees)
    se = (sum((float(a) - p) ** 2 for a in agrees) / (n - 1) / n) ** 0.5 if n > 1 else float("nan")
    return {"consistency": p, "consistency_se": se}


def bootstrap(acc, base, draws=1000, seed=0):
    """95 % percentile intervals of the accuracy and of its paired change against the original, over `draws`
    resamples of the samples (a fixed seed: the same answers give the same interval)."""
    acc, diff = np.asarray(acc, dtype=float), np.asarray(acc, dtype=float) - np.asarray(base, dtype=float)
    pick = np.random.default_rng(seed).integers(0, len(acc), (draws, len(acc)))
    ci = lambda v: [float(q) for q in np.percentile(v[pick].mean(1), [2.5, 97.5])]  # noqa: E731
    return {"vqa_acc_ci95": ci(acc), "delta_ci95": ci(diff)}


def score(idx, conds, done, samples):
    """Every answer scored against the references -> (one row per sample, one summary per condition). The change
    against the original tokens is paired (the same questions), with its standard error over the samples and a
    bootstrap interval; consistency is the agreement with the original tokens' answer."""
    names = [str(s) for s in conds]
    per_sample = []
    for i in idx:
        refs = samples[str(i)].get("answers") or []
        row = {"sample": i, "id": samples[str(i)].get("id"), "question": samples[str(i)]["question"], "answers": refs}
        for n in names:
            a = done[(i, n)]["answer"]
            row[n] = {
                "answer": a,
                "vqa_acc": vqa_accuracy(a, refs),
                "top_answer": top_answer_match(a, refs),
                "changed": a != done[(i, "original")]["answer"],
                "consistent": normalize_answer(a) == normalize_answer(done[(i, "original")]["answer"]),
                "ms": done[(i, n)]["ms"],
            }
        per_sample.append(row)
    scored = [r for r in per_sample if r["answers"]]  # a sample without reference answers has no accuracy
    if not scored:
        raise UserError(f"none of the {len(per_sample)} samples has reference answers: nothing to score")
    summary, N = [], len(scored)
    base = sum(r["original"]["vqa_acc"] for r in scored) / N
    for spec in conds:
        n = str(spec)
        acc = sum(r[n]["vqa_acc"] for r in scored) / N
        d = [r[n]["vqa_acc"] - r["original"]["vqa_acc"] for r in scored]
        se = (sum((x - acc + base) ** 2 for x in d) / (N - 1) / N) ** 0.5 if N > 1 else float("nan")
        summary.append(
            {
                "condition": n,
                "kind": spec.kind,
                "value": spec.rank,  # the rank r, or the kept tokens k
                "rule": spec.rule,
                "codec": spec.codec,
                "n": N,
                "n_without_answers": len(per_sample) - N,
                "vqa_acc": acc,
                "delta": acc - base,
                "delta_se": se,
                "top_answer": sum(r[n]["top_answer"] for r in scored) / N,
                "changed": sum(r[n]["changed"] for r in per_sample) / len(per_sample),
                **consistency([r[n]["consistent"] for r in per_sample]),
                **bootstrap([r[n]["vqa_acc"] for r in scored], [r["original"]["vqa_acc"] for r in scored]),
                "ms_per_sample": sorted(r[n]["ms"] for r in per_sample)[len(per_sample) // 2],
            }
        )
    return per_sample, summary
