"""A local parquet in the toolkit's TextVQA schema (image struct, question, answer[10], dataset_id)
as an lmms-eval task: its own prompt (doc_to_text) and its own scoring (process_results), with our
column names mapped to theirs."""

import io

from lmms_eval.tasks.textvqa import utils as textvqa
from PIL import Image


def as_textvqa(doc):
    return {**doc, "answers": list(doc["answer"] or []), "question_id": doc["dataset_id"]}


def doc_to_visual(doc):
    img = doc["image"]
    if isinstance(img, dict):
        img = Image.open(io.BytesIO(img["bytes"])) if img.get("bytes") else Image.open(img["path"])
    return [img]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return textvqa.textvqa_doc_to_text(as_textvqa(doc), lmms_eval_specific_kwargs)


def process_results(doc, result):
    return textvqa.textvqa_process_results(as_textvqa(doc), result)
