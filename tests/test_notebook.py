"""notebooks/jaxlm_colab.ipynb executed end to end, so that it cannot rot.

Why executed and not just parsed: every cell calls the Python API the way a reader will, and a
renamed function, a changed result key or a progress bar that needs a terminal would only show up
when the cells run. The notebook runs in a real Jupyter kernel of this interpreter (ipykernel,
driven by nbclient) with its `SMOKE = True` parameter, as papermill injects parameters: the same
cells on the synthetic corpus with tiny models, offline.
"""
import json
import pathlib
import sys

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "jaxlm_colab.ipynb"
WIDGET = "application/vnd.jupyter.widget-view+json"


def _kernel(tmp_path, monkeypatch) -> str:
  """A kernelspec running this interpreter, found first on JUPYTER_PATH: a `python3` kernel
  registered elsewhere on the machine (another venv's, a user's) must not be the one that runs."""
  spec = tmp_path / "jupyter" / "kernels" / "jaxlm-test"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "jaxlm test", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
  # One device, as on a reader's CPU runtime (the suite's conftest simulates four).
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  # Identical tiny models recur (the quickstart's two classifiers, the compare arms): compile once.
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "xla-cache"))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  return "jaxlm-test"


def _with_parameters(nb, **params):
  """The notebook with a cell setting `params` right after its "parameters" cell (papermill's
  convention), so the notebook's own cells run unchanged."""
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
  cell = nbformat.v4.new_code_cell(source, id="injected-parameters")
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index + 1, cell)
  return nb


def _text(cell) -> str:
  out = []
  for o in cell.get("outputs", []):
    if o["output_type"] == "stream":
      out.append(o["text"])
    elif "data" in o:
      out.append(o["data"].get("text/markdown", "") or o["data"].get("text/plain", ""))
  return "".join(out)


def _mimes(cell) -> set:
  return {m for o in cell.get("outputs", []) for m in o.get("data", {})}


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("notebook")
  with pytest.MonkeyPatch.context() as monkeypatch:
    kernel = _kernel(tmp, monkeypatch)
    nb = _with_parameters(nbformat.read(NOTEBOOK, as_version=4), SMOKE=True,
                          WORKDIR=str(tmp / "runs"))
    client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=240,
                                     resources={"metadata": {"path": str(tmp)}})
    client.execute()  # a failing cell raises CellExecutionError with its traceback
  return {"cells": {c.get("id"): c for c in nb.cells}, "runs": tmp / "runs"}


def test_notebook_is_valid_and_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert all(not c.get("outputs") and not c.get("execution_count")
             for c in nb.cells if c.cell_type == "code")
  source = "\n".join(c.source for c in nb.cells)
  for needle in ("tfds:imdb_reviews", "jaxlm.quickstart(", "jaxlm.pretrain(", "jaxlm.finetune(",
                 "init_from=LM_DIR", "jaxlm.compare(", "jaxlm.inspect(", "jaxlm.load(", ".predict("):
    assert needle in source, needle
  assert "SMOKE = False" in source  # the notebook a reader opens is the real one


def test_install_cell_uses_the_kernels_jaxlm(executed):
  assert "jaxlm is installed: " + str(ROOT / "jaxlm") in _text(executed["cells"]["install"])
  assert "device(s)" in _text(executed["cells"]["devices"])


def test_quickstart_table(executed):
  text = _text(executed["cells"]["quickstart"])
  assert "jaxlm quickstart" in text and "LM test perplexity" in text
  assert "classifier, pretrained LM" in text and "classifier, from scratch" in text
  summary = json.loads((executed["runs"] / "quickstart" / "summary.json").read_text())
  assert summary["lm"]["steps"] == 6 and summary["classifier_pretrained"]["train_records"] == 64


def test_training_cells_show_widget_progress_bars_and_no_log_lines(executed):
  for name in ("quickstart", "pretrain", "finetune", "compare"):
    cell = executed["cells"][name]
    assert WIDGET in _mimes(cell), (name, cell["outputs"])
    text = _text(cell)
    assert "IProgress not found" not in text  # tqdm.auto fell back to a text bar
    # The API returns results; the CLI's progress lines ("lm (lstm_lm): ... parameters") stay off.
    assert "parameters," not in text and "step 6: valid" not in text, (name, text)


def test_imdb_section_on_the_synthetic_corpus(executed):
  cells = executed["cells"]
  assert "data: synthetic:train=80,test=40,unsup=160" in _text(cells["imdb-data"])
  assert "LM test perplexity" in _text(cells["pretrain"])
  finetune = _text(cells["finetune"])
  assert "copied" in finetune and "test accuracy" in finetune
  table = _text(cells["compare"])
  assert "| strategy |" in table and "| scratch | random |" in table and "| head | pretrained |" in table
  assert "image/png" in _mimes(cells["compare-plot"])  # inline: jaxlm left the backend alone
  assert (executed["runs"] / "imdb_compare" / "compare.png").is_file()


def test_inspect_and_predict_cells(executed):
  cells = executed["cells"]
  inspect = _text(cells["inspect"])
  assert "sentiment_net (classifier)" in inspect and "frozen" in inspect
  predict = _text(cells["predict"]).splitlines()
  labelled = [line for line in predict if line.startswith("label ")]
  assert len(labelled) == 3 and all(" p=" in line for line in labelled)
  assert any("'accuracy'" in line for line in predict)
  assert any(line.startswith("LM perplexity of these reviews:") for line in predict)
