"""Writes textvqa_corpus.json: answers and reference lists built to exercise each step of
lmms-eval's TextVQA scorer (every normalisation step, its order and quirks; 0/1/2/3/4/10 matches;
duplicates; empty; unicode), each with the score lmms-eval 0.7.3 itself gives. Needs lmms-eval (pip
install --no-deps -r requirements-lmms.txt).

    python tests/data/make_textvqa_corpus.py
"""

import json
import statistics
from pathlib import Path

from lmms_eval_scorer import load_processor

ANSWERS = [
    "dont",
    "Don't",
    "isnt",
    "youre",
    "oclock",
    "wont",
    "Im",
    "im",
    "Ive",
    "somebody'd",
    "ow's'at",
    "y'allll",
    "twas",
    "let's",
    "shes",
    "red,blue",
    "red, blue",
    "red ,blue",
    "what?",
    "what ?",
    "it's",
    "its",
    "John's",
    "JOHN'S bar",
    "a dog",
    "the dog",
    "An apple",
    "a",
    "the the",
    "two",
    "Two dogs",
    "none",
    "ten",
    "10",
    "eleven",
    "3.14",
    "3.",
    "end.",
    "...",
    "a.b.c",
    "e.g.",
    "1,000",
    "1,000,000",
    "1, 000",
    "hello-world",
    "hello - world",
    "hello -world",
    "x/y",
    "x / y",
    "(a)",
    "( a )",
    "[b]",
    "{c}",
    "q=1",
    "a+b",
    "back\\slash",
    "snake_case",
    "<tag>",
    "a>b",
    "@home",
    "`tick`",
    "wow!",
    "wow !",
    "semi;colon",
    '"quoted"',
    "tab\tsep",
    "line\nbreak",
    "cr\rsep",
    "  padded  ",
    "",
    " ",
    "UPPER",
    "naïve café",
    "東京",
    "Ünïcödé",
    "ǅemal",
    "'s",
    "." * 40 + "x",
    "a." * 40,
    "nine.",
    "3 . 4",
    "- leading",
    "trailing -",
    "--",
    "a--b",
    "12:30",
    "5pm",
    "$100",
    "100%",
    "#1",
    "no.1",
    "v1.2.3",
    "mr. smith",
    "st. john's",
    "u.s.a.",
    "e-mail",
    "(555) 123-4567",
    "www.site.com",
    "a_b-c/d",
    "1/2",
    "one two three",
    "The End",
    "THE",
    "an",
    "nonexistent",
    "zero zero",
    "Five",
    "ten, eleven",
    "coca-cola",
    "coca cola",
    "cocacola",
    "it 's",
    "stop sign",
    "stop",
    "Stop!",
    "STOP.",
    "exit\n",
    "\texit",
    "exit?",
    "¿qué?",
    "ß",
    "İstanbul",
]
# pairs whose normalised forms the reference may or may not make equal
PAIRS = [
    ("dont", "don't"),
    ("red,blue", "redblue"),
    ("red,blue", "red blue"),
    ("hello-world", "hello world"),
    ("hello-world", "helloworld"),
    ("hello - world", "hello world"),
    ("it's", "it 's"),
    ("its", "it's"),
    ("3.14", "314"),
    ("end.", "end"),
    ("the dog", "dog"),
    ("two", "2"),
    ("none", "0"),
    ("a.b.c", "abc"),
    ("x/y", "x y"),
    ("x / y", "x y"),
    ("(a)", "a"),
    ("wow!", "wow"),
    ("1,000", "1000"),
    ("Im", "I'm"),
    ("im", "i'm"),
    ("coca-cola", "coca cola"),
    ("STOP.", "stop"),
    ("exit?", "exit"),
    ("what?", "what"),
    ("e.g.", "eg"),
    ("u.s.a.", "usa"),
    ("mr. smith", "mr smith"),
    ("tab\tsep", "tab sep"),
    ("5pm", "5 pm"),
]


def reference_score(proc, answer, refs):
    a = proc(answer)
    refs = [proc(r) for r in refs]
    return statistics.mean(
        min(1, float(sum(r == a for j, r in enumerate(refs) if j != i)) / 3)
        for i in range(len(refs))
    )


def cases():
    out = []
    for a in ANSWERS:
        for k in (0, 1, 2, 3, 4, 10):
            out.append({"answer": a, "references": [a] * k + ["zzz other"] * (10 - k)})
    for a, b in PAIRS:
        for k in (1, 3, 10):
            out.append({"answer": a, "references": [b] * k + ["zzz other"] * (10 - k)})
        out.append({"answer": b, "references": [a, a, b, "x", "x", "y", "y", "z", "z", "w"]})
    out.append({"answer": "dog", "references": ["dog", "dog", "dog"]})  # fewer than 10 references
    out.append({"answer": "dog", "references": ["dog"]})
    out.append({"answer": "", "references": [""] * 10})
    return out


if __name__ == "__main__":
    proc = load_processor()
    rows = [
        dict(
            c,
            score=reference_score(proc, c["answer"], c["references"]),
            normalised=proc(c["answer"]),
        )
        for c in cases()
    ]
    path = Path(__file__).with_name("textvqa_corpus.json")
    path.write_text(
        json.dumps(
            {"scorer": "lmms-eval 0.7.3 tasks/textvqa (EvalAIAnswerProcessor)", "cases": rows},
            indent=1,
            ensure_ascii=False,
        )
    )
    print(f"wrote {len(rows)} cases to {path}")
