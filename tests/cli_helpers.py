"""What the CLI tests share: running `jaxlm ARGS` in-process and reading what it printed."""
from jaxlm import cli


def run(capsys, *args):
  """(exit code, stdout, stderr) of `jaxlm ARGS`, through `jaxlm.cli.main` as a shell would call it."""
  capsys.readouterr()
  code = cli.main(["jaxlm", *map(str, args)])
  out, err = capsys.readouterr()
  return code, out, err
