"""Multi-host data parallelism, as far as one machine allows: two processes on localhost.

Why: a multi-host run is several copies of one program that must agree on everything (the
batches, the steps at which they save, who writes the files) without sharing memory, and none of
that is exercised by one process with several devices. Here two processes, each with 4 simulated
CPU devices, connect through `jax.distributed.initialize` (gloo collectives on CPU) and train as
one run; this test process (4 devices, tests/conftest.py) trains the same configs alone.

Checked: `jaxlm finetune --distributed` on 2 processes x 2 devices computes what one process on 4
devices computes (and 1 device, within float tolerance), grafted from an LM saved on 1 device;
every file is written once, by process 0; a stream LM relayed 1 -> 8 -> 1 devices reads back
bit-identical params at each hand-over and ends where the run in one go does; a process with
other data, or a failure on process 0 alone, is an error on every process instead of a hang.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

SOURCE = "synthetic:train=80,test=40,unsup=160"
WORKER_DEVICES = 4  # per process: the mesh spans 8 devices, or 2 of each process's 4


def _tiny(config, num_devices):
  config.data.update(source=SOURCE, batch_size=8, eval_batch_size=8, buckets=(48,), max_len=48)
  config.tokenizer.vocab_size = 200
  config.model.update(embed_dim=16, hidden_size=32, num_layers=1)
  config.train.update(num_devices=num_devices, log_every_steps=1, max_to_keep=5)
  return config


def clf_config(max_steps=4, num_devices=1):
  """64 train / 16 valid records, 8 per batch; dropout on, so the RNG matters."""
  from jaxlm import config as config_lib
  config = _tiny(config_lib.classifier_config(), num_devices)
  config.data.update(num_labeled=0, valid_fraction=0.2)
  config.model.update(dropout_embed=0.1, dropout_hidden=0.1, dropout_output=0.1)
  config.optim.update(learning_rate=3e-3, schedule="constant")
  config.train.update(num_epochs=1, max_steps=max_steps, eval_every_steps=2,
                      checkpoint_every_steps=2)
  return config


def lm_config(max_steps=3, num_devices=1):
  from jaxlm import config as config_lib
  config = _tiny(config_lib.lm_config(), num_devices)
  config.data.update(train_split="unsup", valid_fraction=0.1)
  config.train.update(num_epochs=1, max_steps=max_steps)
  return config


def lm_relay_config(max_steps, num_devices=1):
  """Stream mode: the LSTM state carried between batches is sharded (1 row per device on 8) and
  checkpointed with the params, so a resume on another topology must carry it over too."""
  config = lm_config(max_steps=max_steps, num_devices=num_devices)
  config.data.update(lm_mode="stream", bptt=16)
  config.train.update(checkpoint_every_steps=2, eval_every_steps=2)
  return config


CLI_CONFIG = """import sys
sys.path.insert(0, {tests!r})
from test_distributed import clf_config


def get_config():
  return clf_config(num_devices=4)
"""


def _local(tree):
  """This process's copy of replicated arrays, as numpy."""
  import jax
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _save_npz(path, tree):
  np.savez(path, **_flat(tree))


def _load_npz(path):
  with np.load(path) as f:
    return dict(f)


def _flat(tree):
  import jax
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def worker(root: pathlib.Path, job: str) -> None:
  """One of the two processes. The environment names the coordinator, the process count and this
  process's index, as a launcher would."""
  from jaxlm import checkpoint, cli, commands, distributed
  if job == "finetune":  # through the CLI's --distributed; 2 of this process's 4 devices
    code = cli.main(["jaxlm", "finetune", "--config", str(root / "clf_config.py"), "--init-from",
                     str(root / "lm_1"), "--workdir", str(root / "clf_mp"), "--distributed",
                     "--noprogress"])
    assert code == 0, code
  elif job == "relay":  # steps 3-4 of a run saved on 1 device, on all 8 devices
    distributed.initialize()
    run = commands.train(lm_relay_config(max_steps=4, num_devices=0), root / "relay",
                         kinds=("lm",), progress=False)
    run["lock"].release()
    restored = run["devices"].replicated(checkpoint.restore_params(root / "relay", step=2))
    if distributed.is_primary():
      _save_npz(root / "relay_step2_restored.npz", _local(restored))
      _save_npz(root / "relay_step4.npz", _local(run["state"].params))
    _disagree()
  import jax
  assert jax.process_count() == 2 and jax.device_count() == 2 * WORKER_DEVICES
  print(f"process {jax.process_index()} done", flush=True)


def _disagree() -> None:
  """Processes that would not run the same program fail together, each saying why."""
  import jax
  from jaxlm import distributed
  from jaxlm.errors import ConfigError, JaxlmError
  try:
    distributed.check_same({"rank": np.int32(jax.process_index())}, "the probe")
  except distributed.DistributedError as e:
    print(f"check_same: {e}", flush=True)

  def fail():
    raise ConfigError("only process 0 runs this")
  try:
    distributed.once(fail)
  except JaxlmError as e:
    print(f"once: {type(e).__name__}: {e}", flush=True)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(root: pathlib.Path, job: str) -> list:
  import jax
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={WORKER_DEVICES}",
             JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}",
             JAX_NUM_PROCESSES="2", TF_CPP_MIN_LOG_LEVEL="3")
  cache = jax.config.jax_compilation_cache_dir  # the test session's (tests/conftest.py)
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop("JAXLM_DISTRIBUTED", None)
  procs = []
  for i in range(2):
    log = open(root / f"{job}{i}.log", "w")
    procs.append((subprocess.Popen([sys.executable, __file__, "worker", str(root), job],
                                   env=dict(env, JAX_PROCESS_ID=str(i)), stdout=log,
                                   stderr=subprocess.STDOUT), log))
  return procs


def _wait(procs, root, job, timeout=240) -> list[str]:
  """The processes' output, once both exited 0 (the test fails with their last lines else)."""
  deadline = time.monotonic() + timeout
  codes = []
  for proc, log in procs:
    try:
      codes.append(proc.wait(timeout=max(1, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
      for p, _ in procs:
        p.kill()
      codes.append("timeout")
    log.close()
  logs = [(root / f"{job}{i}.log").read_text() for i in range(2)]
  assert codes == [0, 0], f"processes exited {codes}:\n" + "\n----\n".join(l[-3000:] for l in logs)
  return logs


@pytest.fixture(scope="module")
def finetune(tmp_path_factory):
  """`jaxlm finetune --distributed` in 2 processes (2 devices each, grafted from an LM
  pretrained on 1 device) and the same config in this process on 4 devices and on 1."""
  from jaxlm import commands
  root = tmp_path_factory.mktemp("finetune")
  commands.train(lm_config(), root / "lm_1", kinds=("lm",), progress=False)["lock"].release()
  (root / "clf_config.py").write_text(CLI_CONFIG.format(tests=str(pathlib.Path(__file__).parent)))
  procs = _launch(root, "finetune")
  try:  # meanwhile, the same run in this process
    d4 = commands.finetune(clf_config(num_devices=4), root / "clf_d4", init_from=root / "lm_1",
                           progress=False)
    commands.finetune(clf_config(num_devices=1), root / "clf_d1", init_from=root / "lm_1",
                      progress=False)
  finally:
    logs = _wait(procs, root, "finetune")
  return dict(root=root, logs=logs, d4=d4)


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
  """A stream LM trained in three legs: steps 1-2 here on 1 device, 3-4 in 2 processes on 8
  devices, 5-6 here on 1 device again; and the same 6 steps in one go on 1 device."""
  import jax
  from jaxlm import commands
  root = tmp_path_factory.mktemp("relay")
  first = commands.train(lm_relay_config(max_steps=2), root / "relay", kinds=("lm",),
                         progress=False)
  first["lock"].release()
  step2 = _flat(jax.device_get(first["state"].params))
  procs = _launch(root, "relay")
  try:
    commands.train(lm_relay_config(max_steps=6), root / "one_go", kinds=("lm",),
                   progress=False)["lock"].release()
  finally:
    logs = _wait(procs, root, "relay")
  commands.train(lm_relay_config(max_steps=6), root / "relay", kinds=("lm",),
                 progress=False)["lock"].release()
  return dict(root=root, logs=logs, step2=step2)


def _params(workdir, **kw):
  from jaxlm import checkpoint
  return _flat(checkpoint.restore_params(workdir, **kw))


def _rows(workdir, split="train"):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r.get("split") == split]


def _assert_close(a, b, atol):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


def _assert_identical(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


@pytest.mark.slow
def test_two_processes_train_what_one_process_does(finetune):
  """2 processes x 2 devices = 1 process x 4 devices (the same rows on each device), and = 1
  device up to the order of float sums; an LM saved on 1 device grafts into either."""
  root = finetune["root"]
  mp = _params(root / "clf_mp")
  _assert_close(mp, _params(root / "clf_d4"), atol=1e-6)
  _assert_close(mp, _params(root / "clf_d1"), atol=1e-5)
  summary = json.loads((root / "clf_mp" / "summary.json").read_text())
  assert summary["steps"] == 4 and summary["init_from"] == str(root / "lm_1")
  assert summary["best_valid"] == pytest.approx(finetune["d4"]["best_valid"], abs=1e-5)
  assert summary["test_loss"] == pytest.approx(finetune["d4"]["test_loss"], abs=1e-5)
  np.testing.assert_allclose([r["loss"] for r in _rows(root / "clf_mp")],
                             [r["loss"] for r in _rows(root / "clf_d4")], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_side_effects_happen_once(finetune):
  """Process 0 locks, writes and prints; process 1 trains silently; nothing doubled or left."""
  root, (log0, log1) = finetune["root"], finetune["logs"]
  assert "copied" in log0 and "parameters" in log0 and "test accuracy" in log0
  assert not any(word in log1 for word in ("copied", "parameters", "valid loss", "test accuracy"))
  run = root / "clf_mp"
  assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4]
  assert [r["step"] for r in _rows(run, "valid")] == [2, 4]
  for name in ("config.json", "tokenizer", "summary.json", "metrics.png", "graft_report.json",
               "graft_report.txt"):
    assert (run / name).exists(), name
  assert not (run / ".jaxlm.lock").exists()
  steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4]
  for step in steps:  # process 0 sums each step after orbax's coordinated save
    listing = json.loads((run / "checkpoints" / str(step) / "jaxlm_checksums.json").read_text())
    assert any(name.startswith("state/") for name in listing["files"]), step


@pytest.mark.slow
def test_checkpoints_move_across_topologies(relay):
  """Each leg of the relay reads back exactly the params the previous one saved (1 -> 8 -> 1
  devices), the carried LSTM state too: the relay ends where the run in one go does."""
  root = relay["root"]
  _assert_identical(_load_npz(root / "relay_step2_restored.npz"), relay["step2"])  # 1 -> 8
  _assert_identical(_params(root / "relay", step=4), _load_npz(root / "relay_step4.npz"))  # 8 -> 1
  _assert_close(_params(root / "relay"), _params(root / "one_go"), atol=1e-5)
  relayed, one_go = _rows(root / "relay"), _rows(root / "one_go")
  assert [r["step"] for r in relayed] == [r["step"] for r in one_go] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([r["loss"] for r in relayed], [r["loss"] for r in one_go],
                             rtol=0, atol=1e-5)
  assert "resuming" in relay["logs"][0] and "resuming" not in relay["logs"][1]


@pytest.mark.slow
def test_processes_that_disagree_fail_together(relay):
  log0, log1 = relay["logs"]
  for log in (log0, log1):
    assert "check_same: the probe of process(es) 1 differ from process 0's" in log
  assert "once: ConfigError: only process 0 runs this" in log0
  assert "once: DistributedError: process 0 failed: only process 0 runs this" in log1


def test_initialize_reads_the_launchers_environment(monkeypatch):
  """Off TPU/SLURM the coordinator, count and index come from flags or JAX_* variables; a bad one
  is one line."""
  import jax
  from jaxlm import distributed
  seen = {}
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.update(kw))
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  distributed.initialize()
  assert seen == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
  distributed.initialize("host:1", 2, 0)  # flags win
  assert seen == {"coordinator_address": "host:1", "num_processes": 2, "process_id": 0}
  monkeypatch.setenv("JAX_PROCESS_ID", "one")
  with pytest.raises(distributed.DistributedError, match="JAX_PROCESS_ID='one'"):
    distributed.initialize()

  def fail(**kw):
    raise ValueError("coordinator_address should be defined.")
  monkeypatch.setattr(jax.distributed, "initialize", fail)
  monkeypatch.delenv("JAX_PROCESS_ID")
  with pytest.raises(distributed.DistributedError, match="--coordinator_address HOST:PORT"):
    distributed.initialize()
  monkeypatch.setenv("JAXLM_DISTRIBUTED", "1")
  assert distributed.requested(False)
  monkeypatch.setenv("JAXLM_DISTRIBUTED", "0")
  assert not distributed.requested(False) and distributed.requested(True)


def test_single_process_helpers_are_no_ops():
  from jaxlm import distributed
  assert distributed.is_primary() and not distributed.multiprocess()
  assert distributed.agree(1, 0) == (1, 0)
  assert distributed.once(lambda x: x + 1, 1) == 2
  distributed.barrier("nothing to wait for")
  distributed.check_same({"a": np.arange(3)}, "anything")
  assert len(distributed.mesh_devices(2)) == 2


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
  worker(pathlib.Path(sys.argv[2]), sys.argv[3])
