"""ULMFiT's fine-tuning recipe through the real CLI: gradual unfreezing with a slanted triangular
schedule that starts again at every unfreezing (`optim.schedule_per_phase`), discriminative rates."""
import json

import numpy as np

from jaxlm import config as config_lib
from jaxlm.train import strategies
from cli_helpers import run
from test_cli import CLF_ARGS

RECIPE = ["--config.finetune.strategy=gradual", "--config.finetune.discriminative_decay=2.6",
          "--config.optim.schedule=stlr", "--config.optim.learning_rate=0.01",
          "--config.train.log_every_steps=1", "--config.train.num_epochs=3"]


def _lr_rows(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["learning_rate"] for r in rows if r.get("split") == "train"}


def test_the_logged_rate_restarts_at_every_unfreezing(tmp_path, capsys):
  work = tmp_path / "per_phase"
  code, _, err = run(capsys, "finetune", *CLF_ARGS, *RECIPE, "--config.optim.schedule_per_phase=True",
                     "--workdir", work)
  assert code == 0, err
  lrs = _lr_rows(work)
  steps = sorted(lrs)
  per_epoch = len(steps) // 3
  optim = config_lib.classifier_config().optim
  optim.update(schedule="stlr", learning_rate=0.01)
  one = strategies.make_schedule(optim, per_epoch)  # each epoch is one phase here (3 < 4 groups)
  for step in steps:  # the rate row of step s is the one its update used: count s - 1
    np.testing.assert_allclose(lrs[step], one((step - 1) % per_epoch), rtol=1e-5, err_msg=str(step))
  # The first step of every epoch is back at the bottom of the triangle.
  assert [lrs[1 + e * per_epoch] for e in range(3)] == [lrs[1]] * 3

  whole = tmp_path / "whole"
  code, _, err = run(capsys, "finetune", *CLF_ARGS, *RECIPE, "--workdir", whole)
  assert code == 0, err
  lrs = _lr_rows(whole)
  assert lrs[1 + per_epoch] > lrs[1] * 5  # one triangle over the run: no restart
