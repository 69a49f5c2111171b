"""The one exception type for user mistakes, shared by both packages.

Bad flags, config values, paths, files, data and checkpoints raise a
`UserError` (or a subclass); command-line tools print it as one line with
exit status 2. Any other exception is a bug and keeps its traceback.
It lives here, the package that imports nothing from `textfusion_jax`, so
that both packages can raise it; `textfusion_jax.errors` re-exports it.
"""


class UserError(ValueError):
  """A problem with the user's input, reported as one line."""
