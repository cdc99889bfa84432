"""The layout's rules, read from the code's real imports and definitions (README, "Layout").

1. Dependencies run one way: cluster -> vlm -> data_pipeline; demo/ is used only by cluster/
   and the tests, and uses no cluster/ code; no two modules import each other, directly or
   round a longer circle; models and objectives use neither DeepSpeed, torch.distributed nor Ray.
2. Each shared concern has one owner (the testable ones are checked here).
4. No module over 400 lines, no function over 60 unless a comment on it says why, and every
   module opens with a one-line docstring saying what it owns.
6. pyproject.toml lists exactly the third-party distributions the runtime code imports.
"""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("cluster", "vlm", "data_pipeline", "demo")
LAYER = {"cluster": 3, "vlm": 2, "data_pipeline": 1}  # a module may import its own layer or lower ones
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# Distributions the code needs at run time without importing them by name.
PLUGINS = {"s3fs": "fsspec loads it for s3:// URLs"}


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


MODULES = {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def imported(name: str) -> list[tuple[str, int]]:
    """Every module `name` imports (at any depth of its code), as (dotted name, line): for
    `from P import x` that is P.x where P.x is a module, else P."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in MODULES else base, node.lineno))
    return out


def internal_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _ in imported(m):
            while target and target not in MODULES:  # `import vlm.x.y` where y is a name
                target = target.rpartition(".")[0]
            if target and target != m:
                edges[m].add(target)
    return edges


def test_the_modules_are_read():
    # a rule checked on nothing would pass: the tree has its packages and their imports
    assert {"cluster.cli.main", "vlm.config", "data_pipeline.config", "demo.corpus"} <= set(MODULES)
    assert sum(len(v) for v in internal_edges().values()) > 100


def test_dependencies_run_one_way():
    wrong = []
    for m in MODULES:
        top = m.split(".")[0]
        for target, line in imported(m):
            other = target.split(".")[0]
            if other not in PACKAGES or other == top:
                continue
            if other == "demo" and top != "cluster":
                wrong.append(f"{MODULES[m].relative_to(REPO)}:{line} imports {target} (only cluster/ and tests use demo/)")
            elif top == "demo" and other == "cluster":
                wrong.append(f"{MODULES[m].relative_to(REPO)}:{line} imports {target} (demo/ is below cluster/)")
            elif top in LAYER and other in LAYER and LAYER[other] > LAYER[top]:
                wrong.append(f"{MODULES[m].relative_to(REPO)}:{line} imports {target} "
                             f"(the order is cluster -> vlm -> data_pipeline)")
    assert not wrong, "\n".join(wrong)


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the groups of modules that reach each other."""
    index, low, on_stack, stack, groups, counter = {}, {}, set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1
        stack.append(root); on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]; counter[0] += 1
                    stack.append(child); on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        top = stack.pop(); on_stack.discard(top); group.append(top)
                        if top == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
    return groups


def test_the_cycle_finder_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = strongly_connected(internal_edges())
    assert not cycles, "modules that import each other: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("package", ["vlm.models", "vlm.objectives"])
def test_models_and_objectives_use_no_distributed_runtime(package):
    banned = ("deepspeed", "torch.distributed", "ray")
    wrong = []
    for m in (m for m in MODULES if m == package or m.startswith(package + ".")):
        for target, line in imported(m):
            if any(target == b or target.startswith(b + ".") for b in banned):
                wrong.append(f"{m}:{line} imports {target}")
        for node in ast.walk(TREES[m]):  # `from torch import distributed`
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(
                    a.name == "distributed" for a in node.names):
                wrong.append(f"{m}:{node.lineno} imports torch.distributed")
    assert not wrong, "\n".join(wrong)


def test_module_size_and_docstring():
    wrong = []
    for m, path in MODULES.items():
        lines = path.read_text().count("\n")
        if lines > MAX_MODULE_LINES:
            wrong.append(f"{path.relative_to(REPO)}: {lines} lines (at most {MAX_MODULE_LINES})")
        doc = ast.get_docstring(TREES[m])
        if not doc or not doc.splitlines()[0].strip():
            wrong.append(f"{path.relative_to(REPO)}: no docstring whose first line says what it owns")
    assert not wrong, "\n".join(wrong)


def test_function_size():
    wrong = []
    for m, path in MODULES.items():
        source = path.read_text().splitlines()
        for node in ast.walk(TREES[m]):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            head = source[max(node.lineno - 2, 0): node.lineno + 2]  # the line above to the first lines
            if length > MAX_FUNCTION_LINES and not any(re.search(r"#.*\blong\b", s) for s in head):
                wrong.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {length} lines")
    assert not wrong, "\n".join(wrong) + f"\n(at most {MAX_FUNCTION_LINES}, or a `# long: why` comment)"


def definitions(kind, name: str) -> list[str]:
    out = []
    for m, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, kind) and getattr(node, "name", None) == name:
                out.append(m)
            elif kind is ast.Assign and isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == name for t in node.targets):
                out.append(m)
    return sorted(out)


def calls(attr: str) -> list[str]:
    """Modules that call `<something>.attr(...)`."""
    return sorted({m for m, tree in TREES.items() for node in ast.walk(tree)
                   if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                   and node.func.attr == attr})


def test_ray_is_started_or_joined_in_one_place():
    assert calls("init") and set(calls("init")) <= {"cluster.ray.session"}, calls("init")


def test_one_owner_of_rng_capture_and_object_gathering():
    assert calls("get_rng_state") == ["vlm.checkpoint.rng"]
    assert calls("all_gather_object") == ["vlm.distributed"]


def test_one_owner_of_the_shard_format_and_image_extensions():
    assert definitions(ast.FunctionDef, "atomic_write") == ["data_pipeline.shards.format"]
    assert definitions(ast.FunctionDef, "shard_paths") == ["data_pipeline.shards.format"]
    assert definitions(ast.FunctionDef, "committed_shards") == ["data_pipeline.shards.format"]
    assert definitions(ast.Assign, "IMAGE_EXTS") == ["data_pipeline.shards.format"]
    # no other tuple or set spells out image extensions
    spelled = sorted({m for m, tree in TREES.items() for node in ast.walk(tree)
                      if isinstance(node, (ast.Tuple, ast.Set, ast.List))
                      and {"jpg", "png"} <= {getattr(e, "value", None) for e in node.elts}
                      | {str(getattr(e, "value", "")).lstrip(".") for e in node.elts}})
    assert spelled == ["data_pipeline.shards.format"], spelled


def test_the_cli_reads_no_checkpoint_files_itself():
    """Discovery (`latest`, the root) and verification belong to vlm.checkpoint: no module of
    cluster/ joins a path with, or compares a name to, "latest" or "manifest.json"."""
    names = {"latest", "manifest.json"}
    wrong = []
    for m, tree in TREES.items():
        if not m.startswith("cluster."):
            continue
        for node in ast.walk(tree):
            parts = ([node.left, node.right] if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
                     else [node.left, *node.comparators] if isinstance(node, ast.Compare) else [])
            if any(isinstance(p, ast.Constant) and p.value in names for p in parts):
                wrong.append(f"{MODULES[m].relative_to(REPO)}:{node.lineno}")
    assert not wrong, wrong


def test_one_free_port_helper_in_the_tests():
    """tests/support/ports.py owns it: no other test module defines one or inlines its body."""
    tests = REPO / "tests"
    idiom = re.compile(r"def _?free_port\b|socket\.socket\(\) as s:.*\n\s*s\.bind\(\(\"127\.0\.0\.1\", 0\)\)\n"
                       r"\s*(port = |return )s\.getsockname\(\)\[1\]")
    owners = sorted(str(p.relative_to(tests)) for p in tests.rglob("*.py") if idiom.search(p.read_text()))
    assert owners == ["support/ports.py"], owners


def third_party_imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for m, tree in TREES.items():
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else [])
            for n in names:
                top = n.split(".")[0]
                if top not in sys.stdlib_module_names and top not in PACKAGES and top != "__future__":
                    found.setdefault(top, set()).add(m)
    return found


def normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def test_pyproject_lists_exactly_the_runtime_imports():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    listed = {normalise(re.split(r"[\[<>=!~; ]", d, 1)[0]) for d in project["dependencies"]}
    to_dist = importlib.metadata.packages_distributions()
    needed, unknown = {}, []
    for top, users in third_party_imports().items():
        dists = to_dist.get(top)
        if not dists:
            unknown.append(top)
            continue
        needed[normalise(dists[0])] = sorted(users)[0]
    assert not unknown, f"imported but not installed: {unknown}"
    missing = {d: f"imported by {u}" for d, u in needed.items() if d not in listed}
    extra = sorted(listed - set(needed) - set(PLUGINS))
    assert not missing, f"imported but not in pyproject.toml's dependencies: {missing}"
    assert not extra, f"in pyproject.toml's dependencies but imported nowhere: {extra}"
    assert set(PLUGINS) <= listed
