"""The import graph, built from the source with ast, against the layer table of docs/architecture.md: imports go
down the layers only, never inside a function, never to a script; no function is longer than the house limit."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 80


def modules():
    """{name: ast} of every project module at the top level (tests excluded)."""
    return {p.stem: ast.parse(p.read_text()) for p in sorted(ROOT.glob("*.py")) if not p.stem.startswith("test_")}


def layers():
    """{module: layer number, or 'script'} from the table in docs/architecture.md."""
    out = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        m = re.match(r"\|\s*(\d+|script)\s*\|\s*`(\w+)\.py`\s*\|", line)
        if m:
            assert m.group(2) not in out, f"{m.group(2)} is listed twice"
            out[m.group(2)] = m.group(1) if m.group(1) == "script" else int(m.group(1))
    return out


def top_level_imports(tree, names):
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & names


def test_every_module_is_in_the_layer_table():
    mods, table = set(modules()), set(layers())
    assert mods == table, f"not in docs/architecture.md: {sorted(mods - table)}; gone: {sorted(table - mods)}"


def test_imports_go_down_the_layers_and_never_to_a_script():
    mods, layer = modules(), layers()
    bad = []
    for name, tree in mods.items():
        for dep in top_level_imports(tree, set(mods)):
            if layer[dep] == "script":
                bad.append(f"{name} imports the script {dep}")
            elif layer[name] != "script" and layer[dep] >= layer[name]:
                bad.append(f"{name} (layer {layer[name]}) imports {dep} (layer {layer[dep]})")
    assert not bad, "\n".join(bad)


def test_no_cycle():
    mods = modules()
    graph = {n: top_level_imports(t, set(mods)) for n, t in mods.items()}
    state = {}

    def visit(n, path):
        if state.get(n) == "open":
            raise AssertionError("import cycle: " + " -> ".join(path + [n]))
        if state.get(n) != "done":
            state[n] = "open"
            for d in graph[n]:
                visit(d, path + [n])
            state[n] = "done"

    for n in graph:
        visit(n, [])


def test_no_project_import_inside_a_function():
    mods = modules()
    bad = []
    for name, tree in mods.items():
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    hits = [a.name for a in node.names if a.name.split(".")[0] in mods]
                elif isinstance(node, ast.ImportFrom):
                    hits = [node.module] if node.module and node.module.split(".")[0] in mods else []
                else:
                    continue
                bad += [f"{name}.{fn.name} imports {h}" for h in hits]
    assert not bad, "\n".join(bad)


def test_library_main_blocks_only_run_the_cli():
    """A library module may run (qwenvl_dataloader.py, svd_baseline.py), but its __main__ block only calls
    run_cli(main): the logic stays importable."""
    layer = layers()
    for name, tree in modules().items():
        if layer[name] == "script":
            continue
        for node in tree.body:
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                assert [ast.unparse(s) for s in node.body] == ["run_cli(main)"], name


def test_functions_are_short():
    long = [
        f"{name}.{fn.name}: {fn.end_lineno - fn.lineno + 1} lines"
        for name, tree in modules().items()
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        and fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "\n".join(long)


def test_scripts_expose_their_parser():
    """Every script (and every running library module) builds its flags in get_args_parser(): the flag reference
    in docs/flags.md is generated from these."""
    for name, tree in modules().items():
        runs = any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)
        if runs and name != "train_real_data":  # train_real_data.py runs training's parser
            assert any(isinstance(n, ast.FunctionDef) and n.name == "get_args_parser" for n in tree.body), name
