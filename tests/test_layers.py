"""The package is a layered house: every module of `wsss` belongs to one layer, and imports only from its
own layer and the ones below it (README, "Module map"). The checks read the source (no torch needed),
so a wrong import fails here, named, before it becomes a cycle or a slow import somewhere else."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from wsss import layout

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "wsss"

BASE, ALGORITHMS, ARTIFACTS, ENGINE, STAGES, CLI = range(6)
LAYER_NAMES = ("base", "algorithms", "artifacts", "engine", "stages and methods", "command lines")

LAYERS = {
    # base: names and conventions everything shares; no paths of a run, no torch
    "wsss": BASE,
    "wsss.errors": BASE,
    "wsss.labels": BASE,
    "wsss.layout": BASE,
    "wsss.shapes": BASE,
    # algorithms: arrays in, arrays out; no paths, no flags, no run folders
    "wsss.fusion": ALGORITHMS,
    "wsss.affinity": ALGORITHMS,
    "wsss.mining": ALGORITHMS,
    "wsss.metrics": ALGORITHMS,
    "wsss.crf": ALGORITHMS,
    "wsss.saliency": ALGORITHMS,
    "wsss.losses": ALGORITHMS,
    "wsss.data": ALGORITHMS,
    "wsss.data.transforms": ALGORITHMS,
    "wsss.models": ALGORITHMS,
    "wsss.models.backbones": ALGORITHMS,
    "wsss.models.classifier": ALGORITHMS,
    "wsss.models.segnet": ALGORITHMS,
    "wsss.models.affinity": ALGORITHMS,
    # artifacts: the files of a dataset and of a run, one reader and one writer per format
    "wsss.io": ARTIFACTS,
    "wsss.config": ARTIFACTS,
    "wsss.scoremaps": ARTIFACTS,
    "wsss.data.voc": ARTIFACTS,
    "wsss.viz": ARTIFACTS,
    "wsss.image_scores": ARTIFACTS,
    "wsss.scoring": ARTIFACTS,
    "wsss.tblog": ARTIFACTS,
    "wsss.preset": ARTIFACTS,
    # the run's flags, folder, logging, ranks and seeding, which the stage lifecycle needs: torch-free
    # (its device and precision choices import torch when called)
    "wsss.run": ARTIFACTS,
    "wsss.stage": ARTIFACTS,
    # engine: training, prediction, the device, precision and process runtime
    "wsss.workers": ENGINE,
    "wsss.train": ENGINE,
    "wsss.cam": ENGINE,
    "wsss.saliency_maps": ENGINE,
    "wsss.nets": ENGINE,
    "wsss.modelfile": ENGINE,
    "wsss.predict": ENGINE,
    "wsss.segtrain": ENGINE,
    # stages and methods
    "wsss.erasing": STAGES,
    "wsss.rw": STAGES,
    "wsss.pseudo": STAGES,
    "wsss.segment": STAGES,
    "wsss.methods": STAGES,
    "wsss.methods.gt": STAGES,
    "wsss.methods.registry": STAGES,
    "wsss.methods.psl": STAGES,
    "wsss.methods.stc": STAGES,
    # command lines
    "wsss.cli": CLI,
    "wsss.eval": CLI,
    "wsss.report": CLI,
    "wsss.export": CLI,
    "wsss.data.importer": CLI,
    "wsss.data.synthetic": CLI,
    "wsss.data.voclike": CLI,
}

# modules that must import with torch absent (the evaluator, the report's readers and every algorithm
# or artifact module that has no network in it)
TORCH_FREE = ("wsss.affinity", "wsss.errors", "wsss.labels", "wsss.layout", "wsss.shapes", "wsss.fusion",
              "wsss.mining", "wsss.metrics", "wsss.crf", "wsss.saliency", "wsss.data.transforms", "wsss.io",
              "wsss.scoremaps", "wsss.data.voc", "wsss.viz", "wsss.stage", "wsss.run", "wsss.config", "wsss.scoring",
              "wsss.eval", "wsss.workers", "wsss.saliency_maps")

# The run's folder names, which only wsss/layout.py joins into paths.
FOLDER_NAMES = {layout.STAGE1, layout.STAGE2, layout.STAGE3, layout.CAMS, layout.REGIONS, layout.OVERLAY,
                layout.SALIENCY, layout.FUSED, layout.PSEUDO, layout.PRED, layout.REPORT_FOLDER}
FILE_NAMES = {layout.STAMP, layout.CONFIG, layout.MANIFEST, layout.DONE, layout.CONTACT_SHEET, layout.MODEL,
              layout.REPORT_PAGE}
# (module, name): the places allowed to spell one anyway
SPELLED_ELSEWHERE = {
    # wsss.train is the training loop's own module; its checkpoint and metrics names are defined there
    # for fit(), which writes into whatever folder it is given
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, names) -> set[str]:
    """The wsss modules a file imports, at the top or inside a function (both are dependencies)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in found if n in names}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, mods) - {name} for name, path in mods.items()}


def test_every_module_has_a_layer():
    assert sorted(set(modules()) - set(LAYERS)) == [], "add the new module to LAYERS (and the README's module map)"
    assert sorted(set(LAYERS) - set(modules())) == [], "a module in LAYERS is gone"


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [f"{m} ({LAYER_NAMES[LAYERS[m]]}) imports {d} ({LAYER_NAMES[LAYERS[d]]})"
              for m, deps in graph().items() for d in sorted(deps) if LAYERS[d] > LAYERS[m]]
    assert upward == []


def test_no_import_cycles():
    g = graph()
    # a package imports its own submodules to gather them (wsss.methods, wsss.models): not a cycle
    edges = {m: {d for d in deps if not (d.startswith(m + ".") and not d.startswith(m + "._"))}
             for m, deps in g.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert cycles == []


@pytest.mark.parametrize("name", TORCH_FREE)
def test_torch_free_modules_import_without_torch(name):
    code = f"import sys; sys.modules['torch'] = None; import {name}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]


def _path_literals(tree: ast.AST):
    """(line, text) of every string joined into a path with `/` or globbed, and every f-string
    spelling a stage folder (f"step{k}", f"stage3-{tag}")."""
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and isinstance(side.value, str):
                    yield side.lineno, side.value
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("glob", "rglob") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                yield arg.lineno, arg.value
        elif isinstance(node, ast.JoinedStr) and node.values:
            first = node.values[0]
            if isinstance(first, ast.Constant) and first.value in ("step", f"{layout.STAGE3}-"):
                yield node.lineno, first.value + "{}"


def test_only_the_layout_spells_the_run_folders():
    spelled = []
    for name, path in modules().items():
        if name == "wsss.layout":
            continue
        for line, text in _path_literals(ast.parse(path.read_text())):
            head = text.split("/")[0]
            if (head in FOLDER_NAMES | FILE_NAMES or text.startswith(("step", f"{layout.STAGE3}-"))) \
                    and (name, text) not in SPELLED_ELSEWHERE:
                spelled.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
    assert spelled == [], "use wsss.layout for these"
