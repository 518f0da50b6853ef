"""lmms-eval's TextVQA answer processor, loaded from the installed package's file alone: importing
lmms_eval.tasks would pull in the whole framework, this module needs only `re`."""

import importlib.util


def load_processor():
    """An EvalAIAnswerProcessor instance, or ImportError when lmms-eval is not installed."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "lmms-eval is not installed (pip install --no-deps -r requirements-lmms.txt)"
        )
    path = f"{spec.submodule_search_locations[0]}/tasks/_task_utils/vqa_eval_metric.py"
    mod_spec = importlib.util.spec_from_file_location("lmms_eval_vqa_eval_metric", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.EvalAIAnswerProcessor()
