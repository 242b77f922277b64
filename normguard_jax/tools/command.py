"""The installed console scripts of commands whose ``main(argv)`` returns a result for Python callers."""


def installed(main):
  """``cli(argv=None)`` for ``[project.scripts]``: runs ``main(argv)`` and gives the shell exit status 0 (errors
  exit 2 through SystemExit inside ``main``); ``main`` itself keeps returning its result to Python callers."""
  def cli(argv=None):
    main(argv)
    return 0
  cli.__doc__ = f"The installed command of {main.__module__}.main (exit status 0; errors exit 2)."
  return cli
