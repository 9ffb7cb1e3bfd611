"""The house keeps its rooms: data flows one way through the pipeline, no import cycle anywhere in
``rkort/`` (module level or inside functions), no room over 500 lines, and each room says in its
first docstring line what its one job is. Read statically from the sources."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rkort"

#: The pipeline, lowest room first (see ../shared/DESIGN.md): a module may import only modules in
#: an earlier layer. A new module must be placed here.
LAYERS: list[list[str]] = [
    # foundation: no rkort imports but these
    ["rkort.version", "rkort.errors", "rkort.files", "rkort.platform", "rkort.blobinfo"],
    ["rkort.rehearsal", "rkort.rehearsal.report"],
    ["rkort.stats"],
    ["rkort.options", "rkort.feed", "rkort.profiling", "rkort.accuracy"],
    # 1 load
    ["rkort.model"],
    # 2 plan: graph facts, rules, segments, cost, the plan
    ["rkort.nodes"],
    ["rkort.inline"],
    ["rkort.controlflow"],
    ["rkort.graph"],
    ["rkort.branches"],
    ["rkort.quantized"],
    ["rkort.rules"],
    ["rkort.segments"],
    ["rkort.cost"],
    ["rkort.placement"],
    # 3 shapes
    ["rkort.shapes", "rkort.kvcache"],
    ["rkort.buckets"],
    ["rkort.hints", "rkort.selfmask"],
    # 4 compile
    ["rkort.spec"],
    ["rkort.toolkit.protocol", "rkort.toolkit.console", "rkort.toolkit.hybrid"],
    ["rkort.toolkit.process", "rkort.toolkit.child"],
    ["rkort.toolkit"],
    ["rkort.compiler"],
    # 5 cache
    ["rkort.cache.entry"],
    ["rkort.cache.hashes", "rkort.cache.records"],
    ["rkort.cache.store"],
    ["rkort.cache.bundle", "rkort.cache.remote"],
    ["rkort.cache"],
    ["rkort.traffic", "rkort.fitting", "rkort.calibration", "rkort.padding"],
    ["rkort.face"],
    # 6 backends
    ["rkort.backends.base"],
    [
        "rkort.backends.cpu",
        "rkort.backends.board",
        "rkort.backends.simulator",
        "rkort.backends.pool",
    ],
    ["rkort.backends.adb"],
    ["rkort.backends"],
    # deciding and running a program for a signature
    ["rkort.segment_files", "rkort.trials"],
    ["rkort.partspec"],
    ["rkort.decision"],
    ["rkort.planner"],
    ["rkort.calibsets"],
    ["rkort.quantbuild"],
    ["rkort.program", "rkort.parts"],
    ["rkort.multishape"],
    ["rkort.engine"],
    ["rkort.front"],
    ["rkort.masked"],
    ["rkort.branching"],
    # 7 the session face
    ["rkort.providers", "rkort.iobinding", "rkort.calls"],
    ["rkort.session"],
    ["rkort.capi.onnxruntime_pybind11_state"],
    ["rkort.capi"],
    # integrations into other people's code, the board rehearsal's stand-in
    ["rkort.integrations.defaults", "rkort.rehearsal.standin"],
    ["rkort.integrations.install", "rkort.integrations.run", "rkort.integrations.example"],
    ["rkort.integrations", "rkort.integrations._site", "rkort.rehearsal.site"],
    ["rkort.rehearsal.site.rknnlite", "rkort.rehearsal.site.rknnlite.api"],
    ["rkort"],
    ["rkort.integrations._site.sitecustomize"],
    # the command line
    ["rkort.cli.common"],
    [
        "rkort.cli.cache_cmd",
        "rkort.cli.env",
        "rkort.cli.inspect",
        "rkort.cli.run",
        "rkort.cli.buckets",
    ],
    ["rkort.cli.warmup"],
    ["rkort.cli.check"],
    ["rkort.cli"],
    ["rkort.demo", "rkort.__main__"],
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set[str]:
    """Every rkort module ``name`` imports, anywhere in its body."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the module pkg.sub when there is one.
            targets = [
                f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module
                for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            if target in MODULES and target != name:
                found.add(target)
    return found


def test_every_module_has_a_place_in_the_pipeline() -> None:
    assert sorted(set(MODULES) - set(RANK)) == []
    assert sorted(set(RANK) - set(MODULES)) == []


def test_no_module_imports_one_above_it() -> None:
    upward = [
        f"{name} (layer {RANK[name]}) imports {target} (layer {RANK[target]})"
        for name in MODULES
        for target in sorted(_imports(name))
        if RANK[target] >= RANK[name]
    ]
    assert upward == []


def test_no_import_cycle() -> None:
    graph = {name: _imports(name) for name in MODULES}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_rooms_are_small_and_say_their_job() -> None:
    long = {n: c for n, p in MODULES.items() if (c := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
    silent = []
    for name, path in MODULES.items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if not doc or not doc.strip().splitlines()[0].strip():
            silent.append(name)
    assert silent == []


def test_the_import_reader_sees_relative_and_function_imports() -> None:
    """The checks above are only as good as the reader: it must see the kinds of import rkort
    uses."""
    assert "rkort.placement" in _imports("rkort.planner")  # from . import placement
    assert "rkort.cache" in _imports("rkort.planner")  # from .cache import Cache
    assert "rkort.spec" in _imports("rkort.compiler")
    # an import inside a function counts
    assert "rkort.integrations.install" in _imports("rkort.integrations._site.sitecustomize")
