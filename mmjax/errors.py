"""Errors a user can fix: bad settings, missing files, wrong names (distinct from bugs in mmjax itself).

:class:`UserError` subclasses ``ValueError`` (so ``except ValueError`` and ``pytest.raises(ValueError)`` still catch
it); ``mmjax`` on the command line prints its one-line message and exits with status 2, while any other exception
shows its traceback and exits with status 1 (a bug to report). :class:`ConfigError` is the kind raised when a config
is checked (an unknown key, a value out of range).

>>> try:
...     raise ConfigError("config.batch_size=0 is not valid; expected an int > 0")
... except ValueError as e:
...     print(type(e).__name__, isinstance(e, UserError), e)
ConfigError True config.batch_size=0 is not valid; expected an int > 0
"""

from __future__ import annotations

__all__ = ["ConfigError", "UserError"]


class UserError(ValueError):
    """Bad input that the user can fix; the message names the value, what was expected and how to fix it.

    >>> isinstance(UserError("--config 'x.py': no such file"), ValueError)
    True
    """


class ConfigError(UserError):
    """A config setting that is unknown or not valid (raised by :func:`mmjax.train.config.prepare_config`).

    >>> str(ConfigError("config.num_step is not a known setting; did you mean num_steps?"))
    'config.num_step is not a known setting; did you mean num_steps?'
    """
