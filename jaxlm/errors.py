"""Errors that are part of jaxlm's interface.

Every problem a user can cause (a bad source string, a missing file, a record without a label,
a checkpoint that does not fit a model) raises a subclass of `JaxlmError` with one message that
names what is wrong and where. The CLI prints that message and exits with status 2, without a
traceback; anything else is a bug and keeps its traceback.
"""


class JaxlmError(Exception):
  """Base class of all user-facing errors."""


class DataError(JaxlmError):
  """A data source, file or record that cannot be read as asked."""


class ConfigError(JaxlmError):
  """A config value that is missing, unknown or inconsistent."""


class CheckpointError(JaxlmError):
  """A workdir or checkpoint that is missing, incomplete or does not fit the model."""


class GraftError(CheckpointError):
  """Pretrained weights that cannot be grafted into the target model (paths/shapes listed)."""


class DamagedCheckpointError(CheckpointError):
  """A checkpoint step whose files are missing, truncated or changed since they were saved."""

  def __init__(self, message: str, step: int | None = None, detail: str = ""):
    super().__init__(message)
    self.step, self.detail = step, detail or message
