"""The package's shape: its modules sit on declared layers, import only their own layer or those below
(nothing runs back up, no import cycle, function-level imports included), import no private name of another
module, and none is over 500 lines (docs/architecture.md#module-layers).

``python tests/test_structure.py`` prints the layers and the largest modules.
"""

from __future__ import annotations

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "eagle3_jax"
MAX_LINES = 500

# Each module's layer, by the longest matching prefix (a package's name covers its modules).
LAYERS: dict[str, tuple[int, str]] = {}
_LAYER_NAMES = [
    "foundations: errors, checks, axes, text rules, file formats",
    "schema and placement: configs, config.json, parameters, meshes",
    "models and kernels: the KV cache, attention, targets, the draft head",
    "decoding: the compiled cycle and token selection",
    "runtime: the runner, planning, loading",
    "host jobs: generation, the server's engine and protocol, evaluation, training",
    "interfaces: the command line, the HTTP app, the package's exports",
]
for layer, names in enumerate([
    ["errors", "defaults", "validation", "axes", "platform", "compiled", "compile_cache", "timing", "xla_flags",
     "atomic", "jsonl", "distributed", "text", "data", "bench_prompts", "cli.signals", "demo.corpus",
     "attention.metadata", "weights", "weights.rules", "weights.safetensors_io", "weights.gguf_tokenizer",
     "weights.torch_bin", "serve.metrics", "serve.offload", "serve.http"],
    ["config", "hf_json", "hf_config", "hf_heads", "weights.params", "weights.converted", "sharding"],
    ["kv_cache", "attention", "models", "memory"],
    ["sampling", "decoding"],
    ["runner", "planning", "loading", "hub", "demo", "weights.gguf_io", "weights.gguf_cache", "aot"],
    ["generation", "text_io", "serve", "evaluation", "eval_records", "eval_report", "training", "notebook",
     "demo.run"],
    ["cli", "__main__", "serve.app", ""],
]):
    for name in names:
        LAYERS[name] = (layer, _LAYER_NAMES[layer])


def modules() -> dict[str, pathlib.Path]:
    """Dotted module name (without ``eagle3_jax.``; "" for the package) -> its file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def layer_of(module: str) -> int:
    parts = module.split(".")
    for i in range(len(parts), -1, -1):
        prefix = ".".join(parts[:i])
        if prefix in LAYERS:
            return LAYERS[prefix][0]
    raise KeyError(module)


def imports(mods: dict[str, pathlib.Path]) -> list[tuple[str, str, str | None, int]]:
    """(importer, imported module, the name imported or None, line) of every project import, at any depth."""
    found = []
    for module, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ["eagle3_jax"] + (module.split(".") if module else [])
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    name = ".".join(base + ([node.module] if node.module else []))
                else:
                    name = node.module or ""
                targets = [(f"{name}.{a.name}", a.name) for a in node.names]
            else:
                continue
            for full, imported_name in targets:
                if not full.startswith("eagle3_jax"):
                    continue
                name = full.removeprefix("eagle3_jax").removeprefix(".")
                while name not in mods and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name not in mods:
                    name = ""
                via_name = imported_name if name != full.removeprefix("eagle3_jax.") else None
                if name != module:
                    found.append((module, name, via_name, node.lineno))
    return found


def cycles(mods: dict[str, pathlib.Path], edges) -> list[list[str]]:
    """The import graph's strongly connected components of more than one module (Tarjan)."""
    graph = {m: sorted({b for a, b, _, _ in edges if a == m}) for m in mods}
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10_000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for m in mods:
        if m not in index:
            visit(m)
    return found


def test_every_module_has_a_layer():
    missing = [m for m in modules() if not _has_layer(m)]
    assert not missing, f"modules without a layer in tests/test_structure.py: LAYERS: {missing}"


def _has_layer(module: str) -> bool:
    try:
        layer_of(module)
        return True
    except KeyError:
        return False


def test_imports_never_run_up_the_layers():
    mods = modules()
    upward = [f"eagle3_jax.{a or '__init__'} (layer {layer_of(a)}) imports eagle3_jax.{b} (layer {layer_of(b)}), "
              f"line {line}" for a, b, _, line in imports(mods) if layer_of(b) > layer_of(a)]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    mods = modules()
    assert cycles(mods, imports(mods)) == []


def test_no_private_name_is_imported_across_modules():
    private = [f"eagle3_jax.{a} imports {name} from eagle3_jax.{b} (line {line})"
               for a, b, name, line in imports(modules())
               if name is not None and name.startswith("_") and not name.startswith("__")]
    assert not private, "\n".join(private)


def test_no_module_is_over_500_lines():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_checks_catch_what_they_are_for(tmp_path, monkeypatch):
    """The graph checks see a cycle, a function-level import up the layers and a private name."""
    fake = {"config": tmp_path / "config.py", "runner": tmp_path / "runner.py"}
    fake["config"].write_text("def f():\n    from eagle3_jax.runner import _hidden\n")
    fake["runner"].write_text("from eagle3_jax.config import Thing\n")
    edges = imports(fake)
    assert ("config", "runner", "_hidden", 2) in edges and ("runner", "config", "Thing", 1) in edges
    assert cycles(fake, edges) == [["config", "runner"]]
    assert layer_of("config") < layer_of("runner")


if __name__ == "__main__":
    mods = modules()
    for layer, name in enumerate(_LAYER_NAMES):
        members = sorted(m for m in mods if layer_of(m) == layer)
        print(f"{layer}  {name}\n     {', '.join(m or '(package)' for m in members)}")
    sizes = sorted(((len(p.read_text(encoding='utf-8').splitlines()), m) for m, p in mods.items()), reverse=True)
    print("largest:", ", ".join(f"{m} {n}" for n, m in sizes[:8]))
    print(f"{len(mods)} modules, {len(imports(mods))} imports, cycles: {cycles(mods, imports(mods))}")
