"""jaxlm from a regular (not editable) install: the wheel, its configs, `jaxlm quickstart` anywhere.

Why: an editable install and the test suite both run from the checkout, where configs/ sits next
to the package; a wheel has only what pyproject.toml puts into it. So the slow tests build the
wheel, install it into a fresh environment whose only jaxlm is the wheel's (the dependencies come
from this interpreter's site-packages, added as a plain path, so nothing is downloaded and the
checkout's editable-install hook is not run) and run the CLI from a folder outside the checkout.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from jaxlm import cli, config as config_lib
from jaxlm.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))
SOURCE = "synthetic:train=80,test=40,unsup=160"


def tiny(prefix):
  """Overrides that shrink a quickstart part to seconds (as tests/test_cli.py's `tiny`)."""
  return [f"{prefix}{k}={v}" for k, v in [
      ("data.source", SOURCE), ("data.batch_size", 8), ("data.eval_batch_size", 8),
      ("data.buckets", "(48,)"), ("data.max_len", 48), ("tokenizer.vocab_size", 200),
      ("model.embed_dim", 16), ("model.hidden_size", 32), ("model.num_layers", 1),
      ("train.num_devices", 1)]]


# --- names and paths, in the checkout ---------------------------------------------------------


def test_shipped_configs_are_the_top_level_configs():
  assert config_lib.shipped_configs() == CONFIGS


def test_get_config_by_name_and_part():
  assert config_lib.get_config("imdb_lm").task == "lm"
  assert config_lib.get_config("imdb_lm.py").task == "lm"
  assert config_lib.get_config("quickstart", "pretrain").task == "lm"
  assert config_lib.get_config("quickstart", "finetune").task == "classifier"
  both = config_lib.get_config("quickstart")
  assert "pretrain" in both and "finetune" in both
  assert config_lib.get_config(ROOT / "configs" / "seed003_lstm.py").model.name == "lstm_classifier"


def test_an_existing_path_wins_over_a_shipped_name(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  pathlib.Path("imdb_lm").write_text(
      "from jaxlm.config import lm_config\n\n\ndef get_config():\n"
      "  config = lm_config()\n  config.tokenizer.vocab_size = 123\n  return config\n")
  assert config_lib.get_config("imdb_lm").tokenizer.vocab_size == 123


@pytest.mark.parametrize("name,part,needles", [
    ("imdb", None, ["imdb: No such file", ", ".join(CONFIGS)]),
    ("configs/imdb_lm.py", None, ["No such file"]),  # a path that does not exist is not a name
    ("quickstart", "pretrian", ["no such part", "finetune, pretrain"]),
    ("imdb_lm", "pretrain", ["imdb_lm has no parts"]),
])
def test_unknown_names_and_parts_are_config_errors(tmp_path, monkeypatch, name, part, needles):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ConfigError) as e:
    config_lib.get_config(name, part)
  assert "\n" not in str(e.value)
  for needle in needles:
    assert needle in str(e.value), (needle, str(e.value))


def test_cli_takes_a_shipped_name(capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  args = ["jaxlm", "inspect", "--config", "seed003_lstm", "--config.model.hidden_size=8"]
  assert cli.main(args) == 0
  expected = 25002 * 100 + (100 + 8) * 32 + 2 * 32 + 8 + 1  # overrides apply, as with a path
  assert f"total: {expected:,} parameters" in capsys.readouterr().out
  assert cli.main(["jaxlm", "pretrain", "--config", "nope", "--workdir", str(tmp_path / "w")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "cannot load --config nope" in err and "quickstart" in err
  assert not (tmp_path / "w").exists()


# --- the wheel, installed ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(root, python, jaxlm script, wheel): the wheel built from a copy of the checkout's sources,
  installed alone into a fresh venv that sees this interpreter's dependencies."""
  root = tmp_path_factory.mktemp("install")
  src = root / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  for name in ("jaxlm", "configs"):  # a copy: building writes build/ and *.egg-info into the tree
    shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
  subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "-w", str(root / "dist"), str(src)], check=True, cwd=root)
  (wheel,) = (root / "dist").glob("jaxlm-*.whl")
  env = root / "env"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
  python = env / "bin" / "python"
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        check=True, capture_output=True, text=True).stdout.strip()
  # A plain path, not a site dir: its .pth files (the editable install's hook) are not run.
  deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
  (pathlib.Path(site) / "deps_of_the_test.pth").write_text("\n".join(deps) + "\n")
  subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
                 check=True, cwd=root)
  return {"root": root, "python": python, "jaxlm": env / "bin" / "jaxlm", "wheel": wheel,
          "site": pathlib.Path(site)}


def _run(installed, *args):
  """`args` run in a folder outside the checkout, without PYTHONPATH."""
  cwd = installed["root"] / "elsewhere"
  cwd.mkdir(exist_ok=True)
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
  return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_wheel_holds_every_module_and_the_configs(installed):
  names = set(zipfile.ZipFile(installed["wheel"]).namelist())
  sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "jaxlm").rglob("*")
             if p.suffix in (".py", ".cc") and "__pycache__" not in p.parts}
  assert sources <= names, sorted(sources - names)  # a subpackage missing from pyproject.toml
  assert {f"jaxlm/configs/{c}.py" for c in CONFIGS} <= names
  assert not any(n.startswith("configs/") for n in names)


@pytest.mark.slow
def test_installed_package_reads_its_own_configs(installed):
  probe = ("import json, jaxlm, jaxlm.config as c; print(json.dumps([jaxlm.__file__, "
           "str(c.CONFIG_DIR), c.shipped_configs(), c.get_config('quickstart', 'pretrain').task]))")
  result = _run(installed, installed["python"], "-c", probe)
  assert result.returncode == 0, result.stderr
  module, config_dir, shipped, task = json.loads(result.stdout)
  assert pathlib.Path(module).is_relative_to(installed["site"]), module  # not the checkout
  assert pathlib.Path(config_dir) == installed["site"] / "jaxlm" / "configs"
  assert shipped == CONFIGS and task == "lm"


@pytest.mark.slow
def test_installed_quickstart_runs_anywhere(installed):
  work = installed["root"] / "qs"
  result = _run(installed, installed["jaxlm"], "quickstart", "--workdir", work, "--noprogress",
                *tiny("--config.pretrain."), "--config.pretrain.train.max_steps=4",
                "--config.pretrain.data.test_max_examples=20",
                *tiny("--config.finetune."), "--config.finetune.train.num_epochs=1")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "jaxlm quickstart" in result.stdout
  summary = json.loads((work / "summary.json").read_text())
  assert summary["lm"]["steps"] == 4 and summary["lm"]["test_perplexity"] > 1
  for part in ("classifier_pretrained", "classifier_scratch"):
    assert 0 <= summary[part]["test_accuracy"] <= 1
  assert summary["classifier_pretrained"]["init_from"] == str(work / "lm")


@pytest.mark.slow
def test_installed_pretrain_takes_a_config_part_by_name(installed):
  work = installed["root"] / "lm"
  result = _run(installed, installed["jaxlm"], "pretrain", "--config", "quickstart:pretrain",
                *tiny("--config."), "--config.train.max_steps=3",
                "--config.data.test_max_examples=20", "--noprogress", "--workdir", work)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((work / "summary.json").read_text())
  assert summary["command"] == "pretrain" and summary["steps"] == 3
  result = _run(installed, installed["jaxlm"], "pretrain", "--config", "configs/imdb_lm.py",
                "--workdir", installed["root"] / "never")
  assert result.returncode == 2 and "shipped: " + ", ".join(CONFIGS) in result.stderr
