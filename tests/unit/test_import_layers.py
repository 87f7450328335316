"""Import layering, read from the source (every import statement, module-level or inside a function).

- no import cycle between data_tools modules (data_tools.offline.fetch and .domains used to import each other);
- data_tools may use smat_dist (smat_dist.data, smat_dist.utils), but nothing it reaches there imports data_tools
  back, and smat_dist.data never imports data_tools.
A package's own ``__init__`` is not counted as imported by its submodules (Python runs it first, but that is not
a dependency the submodule states).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("data_tools", "smat_dist")


def module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a module we do not have: its closest known parent
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def cycles(g: dict[str, set[str]], nodes: set[str]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), restricted to ``nodes``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on, stack, out = set(), [], []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g[v] & nodes):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def reach(g: dict[str, set[str]], start: set[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo.extend(g.get(v, ()))
    return seen


def test_the_scanner_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import x\n")
    (pkg / "a.py").write_text("def f():\n    from .b import y\n")
    (pkg / "b.py").write_text("from p import a\n")
    known = {"p", "p.a", "p.b"}
    assert imports_of("p.a", pkg / "a.py", known) == {"p.b"}
    assert imports_of("p.b", pkg / "b.py", known) == {"p.a"}
    assert cycles({"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p.a"}}, known) == [["p.a", "p.b"]]


def test_no_import_cycle_inside_data_tools():
    g = graph()
    data_tools = {m for m in g if m.split(".")[0] == "data_tools"}
    assert "data_tools.offline.domains" in g["data_tools.offline"] and g["data_tools.offline.domains"]
    assert cycles(g, data_tools) == []


def test_smat_dist_modules_used_by_data_tools_do_not_import_data_tools():
    g = graph()
    used = {t for m, ts in g.items() if m.startswith("data_tools") for t in ts if t.startswith("smat_dist")}
    assert used, "data_tools uses smat_dist's logging at least"
    back = sorted(m for m in reach(g, used) if m.startswith("data_tools"))
    assert back == [], f"smat_dist modules that data_tools imports lead back to {back}"
    data_layer = {m for m in g if m.startswith("smat_dist.data")}
    assert sorted(m for m in reach(g, data_layer) if m.startswith("data_tools")) == []


# smat_dist's layer order: a package imports only from itself and the packages before it.
LAYERS = ("utils", "config", "distributed", "data", "model", "pool", "method", "checkpoint", "build", "train",
          "launch", "export", "eval", "predict", "bench", "analysis", "demo")


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "smat_dist" and len(parts) > 1 else None


def _against_the_grain(g: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return sorted(f"{m} -> {t}" for m, ts in g.items() if _layer(m) in rank
                  for t in ts if _layer(t) in rank and rank[_layer(t)] > rank[_layer(m)])


def test_every_smat_dist_package_has_a_layer():
    g = graph()
    assert sorted({_layer(m) for m in g if _layer(m) is not None} - set(LAYERS)) == []


def test_no_package_imports_a_later_layer():
    assert _against_the_grain(graph()) == []


def test_the_layer_check_sees_a_wrong_way_import():
    g = {"smat_dist.pool.shard": {"smat_dist.method.smat"}, "smat_dist.method.smat": {"smat_dist.pool.shard"}}
    assert _against_the_grain(g) == ["smat_dist.pool.shard -> smat_dist.method.smat"]


def test_no_import_cycle_inside_smat_dist():
    g = graph()
    assert cycles(g, {m for m in g if m.startswith("smat_dist")}) == []


def test_the_pool_package_depends_only_on_its_lower_layers():
    """smat_dist.pool may use utils, config, model and distributed.comm only (no method/, train/, DeepSpeed);
    the torch-free preflight (config) never reaches it."""
    g = graph()
    pool = {m for m in g if m == "smat_dist.pool" or m.startswith("smat_dist.pool.")}
    allowed = ("smat_dist.pool", "smat_dist.utils", "smat_dist.config", "smat_dist.model")
    bad = sorted(f"{m} -> {t}" for m in pool for t in g[m] if t.startswith("smat_dist")
                 and not t.startswith(allowed) and t not in ("smat_dist", "smat_dist.distributed.comm"))
    assert bad == []
    config = {m for m in g if m.startswith("smat_dist.config")}
    assert sorted(m for m in reach(g, config) if m.startswith("smat_dist.pool")) == []


def test_distributed_is_the_process_group_and_the_engine_only():
    g = graph()
    assert "smat_dist.distributed.process_group" in g and "smat_dist.distributed.engine" in g
    assert sorted(m for m in g if m.startswith("smat_dist.distributed.")) == [
        "smat_dist.distributed.comm", "smat_dist.distributed.engine", "smat_dist.distributed.process_group",
        "smat_dist.distributed.timeouts", "smat_dist.distributed.zero3_pool"]
