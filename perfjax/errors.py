"""Exception types of perfjax: one clear message that names the source and the problem."""


class PerfjaxError(Exception):
  """Base class of every error perfjax raises on purpose."""


class InputError(PerfjaxError, ValueError):
  """Bad input data: wrong shape, NaN/Inf, unreadable file, missing tags, bad labels.

  The message always starts with the source (a file path, or a name such as
  ``"image"`` for in-memory arrays) so a user knows which file to look at.
  """

  def __init__(self, source, problem: str):
    self.source = str(source)
    self.problem = problem
    super().__init__(f"{self.source}: {problem}")


class TrainingError(PerfjaxError, RuntimeError):
  """Training cannot go on (e.g. a NaN or Inf loss); the last good checkpoint is kept."""
