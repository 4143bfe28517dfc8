"""The one error type of the input pipeline."""


class DataError(ValueError):
  """Bad input data or dataset config.

  The message is one line that names the field or file at fault and what to
  do; the command line turns it into `error: <message>` and exit status 2.
  """
