"""`jaxlm COMMAND`: the command line, thin over the library.

    jaxlm quickstart [--workdir runs/quickstart]
    jaxlm pretrain   --config imdb_lm --workdir DIR [--config.data.source=jsonl:DIR]
    jaxlm finetune   --config imdb_sentiment_net --init-from LM_WORKDIR --workdir DIR
    jaxlm compare    --config FILE --init-from LM_WORKDIR --workdir DIR [--strategies scratch,full,head,top_k=1,gradual]
    jaxlm evaluate   --workdir DIR[,DIR2...] [--split test] [--which best|latest | --step N]
    jaxlm predict    --workdir DIR[,DIR2...] [TEXT ...]   (one text per line on stdin without TEXT)
    jaxlm export     WORKDIR --format safetensors [--out DIR] [--which best|latest | --step N]
    jaxlm inspect    PATH [--strategy S [--epoch E]] [--diff OTHER] [--step N | --which W] [--json]

Configs follow the ml_collections convention of the Flax examples: `--config FILE[:part]` plus
`--config.key=value` overrides; `--config NAME[:part]` names a config shipped with jaxlm
(`imdb_lm`, `quickstart:pretrain`; jaxlm.config.get_config). `--distributed` (pretrain, finetune,
compare) runs one process per host of a TPU pod slice or GPU cluster as one data-parallel run
(README, "Multi-host"). `inspect` takes a workdir, WORKDIR/checkpoints/N, a config file or name
(or `--config` with overrides). `evaluate` and `predict` with several comma-separated classifier
workdirs average their probabilities (an ensemble, e.g. a forward and a backward model). Errors a
user can cause print one line and exit with status 2.
"""
from __future__ import annotations

import os
import sys

COMMANDS = ("quickstart", "pretrain", "finetune", "compare", "evaluate", "predict", "inspect",
            "export")
DISTRIBUTED_COMMANDS = ("pretrain", "finetune", "compare")
USAGE = __doc__


def _define_flags(command: str, argv: list[str]):
  """Flags of one command on a fresh FlagValues, so `main` can run many times in one process
  (tests, notebooks); config_flags reads `--config.key=value` overrides from `argv`, not sys.argv."""
  from absl import flags

  fv = flags.FlagValues()
  if command in ("quickstart", "pretrain", "finetune", "compare", "inspect"):
    _define_config_flag(fv, "quickstart" if command == "quickstart" else None, argv)
  flags.DEFINE_string("workdir", "runs/quickstart" if command == "quickstart" else None,
                      "Run directory: checkpoints, tokenizer, metrics, plots, summary.", flag_values=fv)
  if command == "finetune":
    flags.DEFINE_string("init_from", None, "Workdir of a pretrained run, or a safetensors export "
                        "(its folder or .safetensors file), to graft from (omit: from scratch).",
                        flag_values=fv)
  if command == "compare":
    from jaxlm.compare import DEFAULT_STRATEGIES, FORMS
    flags.DEFINE_string("init_from", None, "Workdir of the pretrained run every arm but scratch "
                        "grafts from.", flag_values=fv)
    flags.DEFINE_string("strategies", DEFAULT_STRATEGIES, f"Comma-separated arms, each trained in "
                        f"WORKDIR/ARM: {FORMS}.", flag_values=fv)
  if command in ("evaluate", "predict"):
    if command == "evaluate":
      flags.DEFINE_string("split", "test", "Split of the run's data source to evaluate on.", flag_values=fv)
      flags.DEFINE_integer("max_examples", 0, "Evaluate on a seeded random subset of this many "
                           "examples (0 = the whole split).", lower_bound=0, flag_values=fv)
    flags.DEFINE_string("which", "best", "Checkpoint: best (by validation) or latest.", flag_values=fv)
    flags.DEFINE_bool("with_linear", False, "Average in the (first) run's linear n-gram model, "
                      "fitted on its train records (the baseline extra).", flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint of this step instead of --which (a damaged one is "
                         "an error, not replaced by an older step).", lower_bound=0, flag_values=fv)
  if command == "inspect":
    _define_inspect_flags(fv)
  if command == "export":
    from jaxlm.interop import FORMATS
    flags.DEFINE_enum("format", "safetensors", list(FORMATS), "What to write: safetensors (PyTorch "
                      "module names, config.json, tokenizer).", flag_values=fv)
    flags.DEFINE_string("out", None, "Folder to write (default: WORKDIR/export).", flag_values=fv)
    flags.DEFINE_enum("which", None, ["best", "latest"], "Checkpoint (default: best for a "
                      "classifier, latest for an LM, as --init-from picks).", flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint of this step instead of --which.",
                         lower_bound=0, flag_values=fv)
  if command in ("pretrain", "finetune"):
    flags.DEFINE_bool("overwrite", False, "Start over: delete the workdir's previous run (its "
                      "checkpoints, tokenizer, metrics) instead of resuming it.", flag_values=fv)
  if command in DISTRIBUTED_COMMANDS:
    flags.DEFINE_bool("distributed", False, "One process per host, all training one run: call "
                      "jax.distributed.initialize first (also: JAXLM_DISTRIBUTED=1).",
                      flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "--distributed off TPU/SLURM/Open MPI: "
                        "HOST:PORT of process 0 (else JAX_COORDINATOR_ADDRESS).", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "--distributed off TPU/SLURM/Open MPI: the number "
                         "of processes (else JAX_NUM_PROCESSES).", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("process_id", None, "--distributed off TPU/SLURM/Open MPI: this process's "
                         "index, 0 on the coordinator (else JAX_PROCESS_ID).", lower_bound=0,
                         flag_values=fv)
  flags.DEFINE_bool("progress", True, "Show progress bars.", flag_values=fv)
  return fv


def _run(command: str, argv: list[str]) -> None:
  from jaxlm import commands, distributed
  from jaxlm.errors import ConfigError

  flags = _define_flags(command, argv)
  try:
    rest = flags(argv)[1:]
  except (AttributeError, KeyError) as e:
    # ml_collections reports a typo in `--config.a.b=v` as AttributeError/KeyError, not a flag error.
    raise ConfigError(_unknown_key_message(e, argv)) from None
  except SyntaxError as e:  # in the --config file itself
    raise ConfigError(f"config file {e.filename} line {e.lineno}: {e.msg}") from None
  needs_workdir = command not in ("inspect", "export")
  if needs_workdir and not flags.workdir:
    raise ConfigError(f"jaxlm {command} needs --workdir DIR")
  if command in DISTRIBUTED_COMMANDS and distributed.requested(flags.distributed):
    # Before jax computes anything: the processes must agree on the devices first.
    distributed.initialize(flags.coordinator_address, flags.num_processes, flags.process_id)
  if command == "quickstart":
    commands.quickstart(flags.config, flags.workdir, progress=flags.progress)
  elif command == "pretrain":
    commands.pretrain(_required_config(flags, command), flags.workdir, progress=flags.progress,
                      overwrite=flags.overwrite)
  elif command == "finetune":
    commands.finetune(_required_config(flags, command), flags.workdir, init_from=flags.init_from,
                      progress=flags.progress, overwrite=flags.overwrite)
  elif command == "compare":
    from jaxlm import compare
    compare.compare(_required_config(flags, command), flags.workdir, init_from=flags.init_from,
                    strategies=flags.strategies, progress=flags.progress)
  elif command == "evaluate":
    commands.evaluate(flags.workdir, split=flags.split, which=flags.which, step=flags.step,
                      max_examples=flags.max_examples, with_linear=flags.with_linear)
  elif command == "predict":
    texts = rest or _stdin_lines()
    if hasattr(sys.stdout, "reconfigure"):  # a C/latin-1 locale must not fail on a CJK text
      sys.stdout.reconfigure(encoding="utf-8")
    commands.predict(flags.workdir, texts, which=flags.which, step=flags.step,
                     with_linear=flags.with_linear)
  elif command == "export":
    from jaxlm import interop
    given = [flags.workdir] if flags.workdir else []
    if len(rest + given) != 1:
      raise ConfigError(f"jaxlm export takes one WORKDIR, got {len(rest + given)}")
    interop.export((rest + given)[0], flags.out, which=flags.which, step=flags.step,
                   fmt=flags.format)
  elif command == "inspect":
    if len(rest) > 1:
      raise ConfigError(f"jaxlm inspect takes one PATH, got {len(rest)}: {' '.join(rest)}")
    commands.inspect(flags.config if flags["config"].present else None, flags.workdir,
                     path=rest[0] if rest else None, strategy=flags.strategy, epoch=flags.epoch,
                     other=flags.diff, step=flags.step, which=flags.which, as_json=flags.json)


def _define_inspect_flags(fv) -> None:
  from absl import flags
  from jaxlm.compare import FORMS
  flags.DEFINE_string("strategy", None, f"Mark each leaf trainable or frozen, with its learning-"
                      f"rate multiplier, under this strategy: {FORMS}, or 'config' (the "
                      "config's own config.finetune).", flag_values=fv)
  flags.DEFINE_integer("epoch", 0, "The epoch --strategy marks (0 = the first; only gradual "
                       "changes with it).", lower_bound=0, flag_values=fv)
  flags.DEFINE_string("diff", None, "Compare PATH's tree with this one's (a workdir, checkpoint, "
                      "config): shared, added, removed and shape-changed paths.", flag_values=fv)
  flags.DEFINE_integer("step", None, "A workdir's checkpoint of this step.", lower_bound=0,
                       flag_values=fv)
  flags.DEFINE_enum("which", None, ["best", "latest"], "A workdir's checkpoint (default: the one "
                    "it is evaluated from: best for a classifier, latest for an LM).",
                    flag_values=fv)
  flags.DEFINE_bool("json", False, "Print the data as JSON instead of the table.", flag_values=fv)


def _stdin_lines() -> list[str]:
  """Every line of stdin, blank ones included and in order, so output line i answers input line i.

  Read as bytes and decoded as UTF-8 with U+FFFD for invalid bytes: a stray byte is neither fatal
  nor echoed raw, whatever the locale. Lines end at "\\n" only (a CRLF's "\\r" is dropped): a lone
  "\\r" (a line end to text-mode reading) or a form feed or U+2028 (to `splitlines`) stays inside
  its line instead of shifting every answer after it.
  """
  if sys.stdin is None:  # started with stdin closed
    return []
  stream = getattr(sys.stdin, "buffer", None)
  data = stream.read().decode("utf-8", "replace") if stream is not None else sys.stdin.read()
  lines = data.split("\n")
  if lines[-1] == "":  # the final newline ends the last line, it does not start another
    lines.pop()
  return [line[:-1] if line.endswith("\r") else line for line in lines]


def _command_help(command: str) -> str:
  """`jaxlm COMMAND --help`: the command's usage line and its flags with their defaults."""
  usage = next(" ".join(line.split()) for line in USAGE.splitlines()
               if line.strip().startswith(f"jaxlm {command} "))
  fv = _define_flags(command, [f"jaxlm {command}"])
  lines = []
  for name in sorted(fv):
    flag = fv[name]
    shown = "init-from" if name == "init_from" else name
    if flag.flag_type() == "bool":
      shown = f"[no]{shown}"
    given = getattr(flag, "default_unparsed", flag.default)  # --config: the name, not the config
    default = "" if given is None else f" (default: {given!r})"
    lines.append(f"  --{shown}: {flag.help}{default}")
  if "config" in fv:
    lines.append("  --config.KEY=VALUE: override one config field (all fields and defaults: "
                 "jaxlm/config.py)")
  return f"usage: {usage}\n\n" + "\n".join(lines)


def _unknown_key_message(error, argv) -> str:
  """One line naming the override with the unknown key and ml_collections' suggestion."""
  while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError(msg))
    error = error.args[0]
  text = str(error.args[0]) if error.args else str(error)
  key = text.split("'")[1] if text.count("'") >= 2 else ""
  text = "; ".join(line.strip() for line in text.splitlines() if line.strip())
  names = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
  offending = next((n for n in names if key and key in n.split(".")), None) or ", ".join(names)
  return f"unknown config key in {offending}: {text}"


def _define_config_flag(fv, default: str | None, argv: list[str]) -> None:
  """`--config NAME|FILE[:part]` with `--config.key=value` overrides: ml_collections' config flag,
  but loading through `jaxlm.config.get_config`, so a shipped config's name works from any folder
  (a pip install has no configs/ to point a path at) and the CLI and Python code resolve names
  alike. config_flags has no public hook for the loader; `_ConfigFlag` is what
  `DEFINE_config_file` builds, here given another parser."""
  from absl import flags
  from ml_collections.config_flags import config_flags

  from jaxlm import config as config_lib
  from jaxlm.errors import ConfigError

  class Parser(flags.ArgumentParser):

    def flag_type(self):
      return "config object"

    def parse(self, argument):
      name, _, part = argument.partition(":")
      try:
        config = config_lib.get_config(name, part or None)
      except ConfigError as e:
        raise ConfigError(f"cannot load --config {e}") from None
      except OSError as e:  # raised by the config file itself
        raise ConfigError(f"cannot load --config {argument}: {e}") from None
      config.lock()
      return config

  flag = config_flags._ConfigFlag(  # pylint: disable=protected-access
      parser=Parser(), serializer=flags.ArgumentSerializer(), name="config",
      default=default, flag_values=fv, sys_argv=argv,
      help_string=f"A shipped config ({', '.join(config_lib.shipped_configs())}) or a config "
                  "file, either with :part for one part of a multi-part config.")
  flags.DEFINE_flag(flag, fv)


def _required_config(flags, command):
  from jaxlm.errors import ConfigError
  if flags.config is None:
    from jaxlm.config import shipped_configs
    raise ConfigError(f"jaxlm {command} needs --config NAME|FILE (shipped: "
                      f"{', '.join(shipped_configs())})")
  return flags.config


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(USAGE)
    return 0
  command = argv[1]
  if command not in COMMANDS:
    print(f"jaxlm: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
    return 2
  if any(a in ("-h", "--help", "--helpfull") for a in argv[2:]):
    print(_command_help(command))
    return 0
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  # Before jax starts its threads: steps stop page-faulting their buffers in (jaxlm/malloc.py).
  from jaxlm import malloc
  malloc.tune()
  # `--init-from` reads better on a command line; absl flag names use underscores.
  args = [a.replace("--init-from", "--init_from", 1) if a.startswith("--init-from") else a
          for a in argv[2:]]
  # orbax logs routine events as absl WARNINGs ("Given directory is read only", "Requested
  # `tracked_metric`"); they are not actionable for a user, so the CLI shows only errors.
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)
  from jaxlm.errors import JaxlmError
  try:
    _run(command, [f"jaxlm {command}"] + args)
  except JaxlmError as e:
    # Interrupted (jaxlm/train/signals.py) is not an error of the user's: it says where to resume
    # and exits 128 + the signal, as shells and schedulers expect.
    code = getattr(e, "exit_code", 2)
    print(f"jaxlm {command}: {'error: ' if code == 2 else ''}{e}", file=sys.stderr)
    return code
  except KeyboardInterrupt:  # a second Ctrl-C, or one outside a training loop
    print(f"jaxlm {command}: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # absl flag errors: bad --config.key overrides, unknown flags
    from absl import flags as absl_flags
    if isinstance(e, absl_flags.Error):
      print(f"jaxlm {command}: error: {e}", file=sys.stderr)
      return 2
    raise
  return 0


if __name__ == "__main__":
  sys.exit(main())
