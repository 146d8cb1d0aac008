"""Multi-process tests meet a known upstream crash: XLA:CPU's cross-process collectives (gloo) with several host
devices per process segfault now and then (openxla/xla#16430, open). Such a crash is not what these tests check, so
a scenario whose process died of SIGSEGV is run once more, from scratch, with a warning that says so; a second crash,
or any other failure, fails the test. The child processes run with ``PYTHONFAULTHANDLER=1``, so the warning carries
the Python stack of the crash."""

import signal
import warnings


class NativeCrash(AssertionError):
    """A child process died of SIGSEGV."""


def check_not_crashed(returncode, stderr: str, who: str) -> None:
    """Raises :class:`NativeCrash` when ``returncode`` says the process died of SIGSEGV."""
    if returncode == -signal.SIGSEGV:
        raise NativeCrash(f"{who} died of SIGSEGV:\n{stderr[-4000:]}")


def run_with_one_retry_after_a_crash(scenario, *args):
    """``scenario(attempt, *args)``; after a :class:`NativeCrash`, warns and runs ``scenario(1, *args)`` once."""
    try:
        return scenario(0, *args)
    except NativeCrash as crash:
        warnings.warn(
            f"a child process crashed in native code (openxla/xla#16430: XLA:CPU collectives with several host "
            f"devices per process); running the scenario once more. {crash}",
            stacklevel=2,
        )
        return scenario(1, *args)


def fail_if_one_ended(procs) -> None:
    """While a multi-process job should still run: if one of ``procs`` has ended, kills the others (they would wait
    for their peer until the heartbeat timeout) and fails, with :class:`NativeCrash` for a SIGSEGV."""
    for i, p in enumerate(procs):
        if p.poll() is not None:
            _, stderr = p.communicate()
            for q in procs:
                q.kill()
            check_not_crashed(p.returncode, stderr, f"process {i}")
            raise AssertionError(f"process {i} ended early (exit {p.returncode}):\n{stderr[-6000:]}")
