"""Helper scripts that tests run as subprocesses (multi-process training, kill -9 and resume)."""
