"""The notebooks in colabs/: stored clean, and each runs top to bottom on its tiny setting.

Execution goes through nbclient and a real IPython kernel started at the
repository root, with the parameters cell overridden by an injected cell (as
papermill does): TINY, the synthetic embedded fixture, a temporary workdir.
"""

import ast
import pathlib
import re
import shutil

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parent.parent
COLABS = ROOT / "colabs"
NOTEBOOKS = sorted(p.name for p in COLABS.glob("*.ipynb"))


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(COLABS / name, as_version=4)


def _parameters_index(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"want one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def test_all_four_notebooks_exist():
    assert NOTEBOOKS == ["analysis.ipynb", "detection.ipynb", "quickstart.ipynb", "routing.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_clean_with_badge_and_parameters(name):
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "stored with outputs"
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    assert f"(https://colab.research.google.com/github/jaxspec/jaxspec/blob/main/colabs/{name})" in first.source
    i = _parameters_index(nb)
    assert nb.cells[i] is code[0], "the parameters cell must be the first code cell"
    assert re.search(r"^TINY = False\b", nb.cells[i].source, re.MULTILINE)
    assert re.search(r"^WORKDIR = ", nb.cells[i].source, re.MULTILINE)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_code_parses_and_shell_commands_run_only_in_colab(name):
    transform = TransformerManager().transform_cell
    for cell in _read(name).cells:
        if cell.cell_type != "code":
            continue
        ast.parse(transform(cell.source))
        lines = cell.source.splitlines()
        for j, line in enumerate(lines):
            if line.lstrip().startswith(("!", "%")):
                assert line.startswith("    "), f"unguarded shell line {line!r}"
                guard = next(prev for prev in reversed(lines[:j]) if not prev.startswith("    "))
                assert guard == "if IN_COLAB:", f"{line!r} is not under `if IN_COLAB:`"


@pytest.fixture(scope="module")
def manifest(embedded_manifest):
    return embedded_manifest


def execute(name: str, monkeypatch, **params) -> nbformat.NotebookNode:
    """Runs notebook `name` with `params` injected after its parameters cell; returns it with outputs."""
    nb = _read(name)
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(_parameters_index(nb) + 1, injected)
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "8")  # as tests/conftest.py: the kernel shares the compile cache
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    return nb


def _outputs(nb, mime: str) -> list:
    return [
        o["data"][mime]
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.get("output_type") in ("display_data", "execute_result") and mime in o.get("data", {})
    ]


def _tiny(manifest, workdir) -> dict:
    return {
        "TINY": True,
        "DATA_MANIFEST": manifest,
        "DATA_DIR": str(pathlib.Path(manifest).parent / "cache"),
        "WORKDIR": str(workdir),
    }


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One workdir tree for the three classifier notebooks, run in this order: the quickstart resumes a copy
    of the session's tiny main run, analysis resumes the quickstart's run, routing resumes it as its
    `animals` group (the same tiny config), so the suite trains one generalist for all of them; each
    notebook still runs top to bottom."""
    return tmp_path_factory.mktemp("notebooks")


# The classifier notebooks start from the session's tiny main run (tests/conftest.py), on its worker.
SHARED = pytest.mark.xdist_group("tiny_main")


@SHARED
def test_quickstart_runs(manifest, shared, tiny_main_run, monkeypatch):
    # The session's run has the quickstart's config (validation aside, which changes no result): the
    # notebook's run.run resumes a copy of its workdir.
    shutil.copytree(tiny_main_run.workdir, shared / "animals")
    nb = execute("quickstart.ipynb", monkeypatch, **_tiny(manifest, shared / "animals"))
    markdown = "\n".join(_outputs(nb, "text/markdown"))
    assert "| specialist (extract), tuned |" in markdown and "| generalist | 30 | 32 |" in markdown
    assert len(_outputs(nb, "image/png")) == 2  # the per-class change and the curves
    assert (shared / "animals" / "report.md").exists()


@SHARED
def test_analysis_runs(manifest, shared, monkeypatch):
    nb = execute("analysis.ipynb", monkeypatch, **_tiny(manifest, shared / "animals"))
    assert len(_outputs(nb, "image/png")) == 4  # CKA heatmap and same-layer curve, two UMAPs
    assert (shared / "animals" / "analysis" / "cka.json").exists()


@SHARED
def test_routing_runs(manifest, shared, monkeypatch):
    nb = execute("routing.ipynb", monkeypatch, **_tiny(manifest, shared))
    table = "\n".join(_outputs(nb, "text/markdown"))
    for row in ("| animals | 10 | 40 |", "| clothing | 10 | 40 |", "| digits | 10 | 40 |", "| **all** | | 120 |"):
        assert row in table  # 4 test images per class in the fixture
    assert len(_outputs(nb, "image/png")) == 1


@pytest.mark.xdist_group("colab_detection")
def test_detection_runs(manifest, tmp_path, monkeypatch):
    nb = execute("detection.ipynb", monkeypatch, **_tiny(manifest, tmp_path / "run"))
    markdown = "\n".join(_outputs(nb, "text/markdown"))
    assert "| specialist (suppress), tuned |" in markdown and "| scratch specialist (same data) |" in markdown
    # scenes, the animal scenes, and the specialist's detections beside the same scenes' ground truth
    assert len(_outputs(nb, "image/png")) == 3
    assert (tmp_path / "run" / "specialist_boxes.png").exists()
