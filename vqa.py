"""
Downstream scoring and conditions: the VQA accuracy of an answer, the conditions a run asks (original, zeros,
truncated SVD, the factoriser, kept tokens) and the vision tokens each condition gives the model, and the report
over a run's answers.
"""

import hashlib
import json
import re
from collections import Counter

import torch

from cli import UserError, check_rank, parse_ints
from feature_cache import denormalize, normalize
from metrics import timed, truncated_svd
from token_selection import RULES, select
from vlm import answer, mrope_positions

PROMPT = "{question}\nAnswer the question using a single word or phrase."

# ----------------------------------------------------------------------------------------------------------------
# VQA accuracy

_PUNCT = set(';/[]"{}()=+\\_-><@`,?!')
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(s):
    """The VQA evaluation's answer normalisation: whitespace; each punctuation mark is deleted where it touches a space
    (or where the text has a digit,digit comma), else replaced by a space; periods not before a digit deleted; lower
    case; number words to digits; articles dropped."""
    t = " ".join(str(s).replace("\n", " ").replace("\t", " ").split())
    digit_comma = re.search(r"\d,\d", t) is not None
    out = t
    for p in _PUNCT:
        if p in t:
            out = out.replace(p, "" if (p + " " in t or " " + p in t or digit_comma) else " ")
    out = re.sub(r"\.(?!\d)", "", out)
    return " ".join(_NUMBERS.get(w, w) for w in out.lower().split() if w not in _ARTICLES)


def vqa_accuracy(answer, references):
    """min(#references equal to the answer / 3, 1), averaged over the len(references) subsets that leave one
    reference out (10 choose 9 for VQA's 10 answers); both sides normalised."""
    a = normalize_answer(answer)
    refs = [normalize_answer(r) for r in references]
    if not refs:
        return float("nan")
    accs = [min(sum(r == a for j, r in enumerate(refs) if j != i) / 3, 1.0) for i in range(len(refs))]
    return sum(accs) / len(accs)


def exact_match(answer, references):
    """1.0 when the normalised answer equals the most common normalised reference."""
    refs = [normalize_answer(r) for r in references]
    return float(bool(refs) and normalize_answer(answer) == Counter(refs).most_common(1)[0][0])


# ----------------------------------------------------------------------------------------------------------------
# conditions


def conditions(args, nn_rank, arch):
    """[(name, kind, value)] in the order they are asked; parsed from the flags."""
    out = [("original", "original", None)]
    if args.zeros:
        out.append(("zeros", "zeros", None))
    svd_ranks = parse_ints(args.svd_ranks, "--svd_ranks")
    out += [(f"svd r={r}", "svd", r) for r in svd_ranks]
    if nn_rank:
        auto = [r for r in svd_ranks if (r == nn_rank if arch == "symmetric" else r <= nn_rank)]
        nn_ranks = parse_ints(args.nn_ranks, "--nn_ranks") if args.nn_ranks != "auto" else auto
        out += [(f"{arch} r={r}", "nn", r) for r in nn_ranks]
    rules = [r for r in args.rules.split(",") if r.strip()]
    out += [(f"{rule} k={k}", "keep", (rule, k)) for rule in rules for k in parse_ints(args.keep, "--keep")]
    return out


def check_prompt(prompt):
    """--prompt may name only {question}."""
    try:
        prompt.format(question="")
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(
            f"--prompt {prompt!r}: only {{question}} can be filled in ({type(e).__name__}: {e}); write "
            f"a literal brace as {{{{ or }}}}"
        ) from None


def vision_tokens(kind, value, X, Xn, svd, norm, nn_model, hw, basis, gen):
    """-> (tokens [T', D] in the model's scale, kept indices or None). X: the tower's tokens, Xn = normalize(X);
    svd: (A, B) of Xn's truncated SVD at the largest --svd_ranks. Reconstructions in the factoriser's space (norm),
    mapped back with each token's own mean and standard deviation."""
    if kind == "original":
        return X, None
    if kind == "zeros":
        return torch.zeros_like(X), None
    if kind == "keep":
        rule, k = value
        return None, select(rule, Xn, k, hw, basis, gen).sort().values
    if kind == "svd":
        Xh = svd[0][:, :value] @ svd[1][:value]
    else:
        Xh = nn_model(Xn[None], rank=value)[0]
    return denormalize(Xh, X, norm), None


def check_conditions(conds, arch, nn_rank, results_dir, hw, dim):
    """Every condition's rank or k within what the run's model and the cache's features allow."""
    for _, kind, v in conds:
        if kind == "nn" and arch == "symmetric" and v != nn_rank:
            raise UserError(
                f"--nn_ranks {v}: the symmetric model in {results_dir} serves only its trained rank {nn_rank}"
            )
        if kind == "nn" and not 1 <= v <= nn_rank:
            raise UserError(f"--nn_ranks {v}: the model in {results_dir} serves ranks 1..{nn_rank} (its trained rank)")
        if kind == "svd":
            check_rank(v, min(hw[0] * hw[1], dim), "--svd_ranks")
        if kind == "keep":
            if v[0] not in RULES:
                raise UserError(f"--rules: unknown '{v[0]}'; choose from {', '.join(RULES)}")
            check_rank(v[1], hw[0] * hw[1], "--keep")


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
    """Asks the model one question about one image under each condition. The vision tower runs once per sample;
    the SVD at the largest rank is taken once and truncated for the smaller ones."""

    def __init__(self, model, proc, dtype, norm, hw, nn_model, basis, max_svd, seed, prompt, max_new_tokens):
        self.model, self.proc, self.dtype, self.norm, self.hw = model, proc, dtype, norm, hw
        self.dev = next(model.parameters()).device
        self.nn_model = nn_model.to(self.dev) if nn_model is not None else None
        self.basis, self.max_svd, self.prompt, self.max_new_tokens = basis, max_svd, prompt, max_new_tokens
        self.seed = seed
        self.img_id, self.eos = model.config.image_token_id, eos_ids(model, proc.tokenizer)

    def ask(self, sample, image, question, conds):
        """Yield one record per condition: its answer, the answer's token ids, ms (the condition's tokens and the
        answer) and tower_ms (the shared run of the vision tower). Every answer is a function of (sample,
        condition, seed) alone: the random rule draws from a generator seeded by all three, so a resumed run
        answers as an uninterrupted one."""
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": self.prompt.format(question=question)}],
            }
        ]
        text = self.proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.proc(text=[text], images=[image], return_tensors="pt")
        ids = inputs["input_ids"][0].to(self.dev)
        with torch.no_grad():
            pixels, grid = inputs["pixel_values"].to(self.dev, self.dtype), inputs["image_grid_thw"].to(self.dev)
            V, secs = timed(lambda: self.model.model.visual(pixels, grid_thw=grid), device=self.dev)
            V = getattr(V, "pooler_output", V).float()
        positions = mrope_positions(ids.cpu(), self.img_id, self.hw)
        Xn = normalize(V, self.norm)
        svd = [f[0] for f in truncated_svd(Xn[None], self.max_svd)[:2]] if self.max_svd else None
        for cname, kind, v in conds:

            def run():
                with torch.no_grad():
                    gen = torch.Generator().manual_seed(draw_seed(self.seed, sample, cname))
                    Vc, kept = vision_tokens(kind, v, V, Xn, svd, self.norm, self.nn_model, self.hw, self.basis, gen)
                    if kept is not None:
                        Vc = V[kept.to(V.device)]
                return answer(
                    self.model, self.proc, ids, positions, Vc, kept, self.img_id, self.max_new_tokens, self.eos
                )

            (text_out, toks), ms = timed(run, device=self.dev)
            yield {"condition": cname, "answer": text_out, "tokens": toks, "ms": ms * 1e3, "tower_ms": secs * 1e3}


def score(idx, conds, done, samples):
    """Every answer scored against the references -> (one row per sample, one summary per condition). The change
    against the original tokens is paired (the same questions), with its standard error over the samples."""
    names = [c[0] for c in conds]
    per_sample = []
    for i in idx:
        refs = samples[str(i)].get("answers") or []
        row = {"sample": i, "id": samples[str(i)].get("id"), "question": samples[str(i)]["question"], "answers": refs}
        for n in names:
            a = done[(i, n)]["answer"]
            row[n] = {
                "answer": a,
                "vqa_acc": vqa_accuracy(a, refs),
                "exact": exact_match(a, refs),
                "changed": a != done[(i, "original")]["answer"],
                "ms": done[(i, n)]["ms"],
            }
        per_sample.append(row)
    scored = [r for r in per_sample if r["answers"]]  # a sample without reference answers has no accuracy
    if not scored:
        raise UserError(f"none of the {len(per_sample)} samples has reference answers: nothing to score")
    summary, N = [], len(scored)
    base = sum(r["original"]["vqa_acc"] for r in scored) / N
    for n, kind, v in conds:
        acc = sum(r[n]["vqa_acc"] for r in scored) / N
        d = [r[n]["vqa_acc"] - r["original"]["vqa_acc"] for r in scored]
        se = (sum((x - acc + base) ** 2 for x in d) / (N - 1) / N) ** 0.5 if N > 1 else float("nan")
        summary.append(
            {
                "condition": n,
                "kind": kind,
                "value": v,
                "n": N,
                "n_without_answers": len(per_sample) - N,
                "vqa_acc": acc,
                "delta": acc - base,
                "delta_se": se,
                "exact": sum(r[n]["exact"] for r in scored) / N,
                "changed": sum(r[n]["changed"] for r in per_sample) / len(per_sample),
                "ms_per_sample": sorted(r[n]["ms"] for r in per_sample)[len(per_sample) // 2],
            }
        )
    return per_sample, summary
