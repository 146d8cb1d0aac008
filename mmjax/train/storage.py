"""Run directories that may live on a remote store: a local path or a URI (``gs://``, ``s3://``, ... any scheme
``etils.epath`` knows, which is what orbax-checkpoint writes to).

A local path is made absolute once (:func:`resolve`); a URI is kept as given (``os.path.abspath("gs://b/x")`` would
be ``<cwd>/gs:/b/x``). Every read and write of a run's files goes through ``etils.epath``, and every file is
written atomically (:func:`write_bytes`: a uniquely named sibling, then a rename), so a killed run never leaves a
half-written ``config.json`` or vocabulary, and several processes of a multi-host run may write the same file. Object
stores do not append: what must grow (``metrics.jsonl``) is rewritten whole there (see
:class:`mmjax.train.metrics.MetricLogger`). Remote schemes need their filesystem package at run time (``gcsfs`` for
``gs://`` without TensorFlow, ``s3fs`` for ``s3://``).

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> resolve("gs://bucket/run"), resolve(d) == d, is_uri("gs://bucket/run"), is_uri(d)
('gs://bucket/run', True, True, False)
>>> write_text(join(d, "a", "config.json"), "{}")
>>> read_text(join(d, "a", "config.json")), exists(join(d, "a", "config.json"))
('{}', True)
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator

from etils import epath

__all__ = [
    "is_uri",
    "resolve",
    "join",
    "path",
    "exists",
    "read_text",
    "write_text",
    "write_bytes",
    "staged",
    "call_staged",
]


def is_uri(p: str | os.PathLike) -> bool:
    """Whether ``p`` names a location by URI (``scheme://...``) rather than a local path.

    >>> is_uri("s3://b/x"), is_uri("/tmp/x"), is_uri("runs/x")
    (True, False, False)
    """
    return "://" in os.fspath(p)


def resolve(p: str | os.PathLike) -> str:
    """A URI unchanged; a local path made absolute.

    >>> resolve("gs://b/run/"), resolve("/tmp/../tmp/run")
    ('gs://b/run', '/tmp/run')
    """
    p = os.fspath(p)
    return p.rstrip("/") if is_uri(p) else os.path.abspath(p)


def join(base: str | os.PathLike, *names: str) -> str:
    """``base/name/...`` for a local path or a URI.

    >>> join("gs://b/run", "checkpoints", "3")
    'gs://b/run/checkpoints/3'
    """
    base = os.fspath(base)
    return posixpath.join(base, *names) if is_uri(base) else os.path.join(base, *names)


def path(p: str | os.PathLike) -> epath.Path:
    """``p`` (see :func:`resolve`) as an ``etils.epath.Path``.

    >>> path("gs://b/run") / "config.json"
    PosixGPath('gs://b/run/config.json')
    """
    return epath.Path(resolve(p))


def exists(p: str | os.PathLike) -> bool:
    """Whether the file or directory ``p`` exists.

    >>> exists("/nonexistent/config.json")
    False
    """
    return path(p).exists()


def read_text(p: str | os.PathLike) -> str:
    """The text of the file ``p``.

    >>> import tempfile
    >>> f = os.path.join(tempfile.mkdtemp(), "x.txt")
    >>> write_text(f, "hello")
    >>> read_text(f)
    'hello'
    """
    return path(p).read_text()


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to the file ``p`` atomically (parents created): readers see the old file or the whole new one.

    The data go to a sibling named uniquely (process id and a random suffix, so concurrent writers never share one)
    that is then renamed over ``p``.

    >>> import tempfile
    >>> f = os.path.join(tempfile.mkdtemp(), "sub", "x.bin")
    >>> write_bytes(f, b"abc")
    >>> open(f, "rb").read(), sorted(os.listdir(os.path.dirname(f)))
    (b'abc', ['x.bin'])
    """
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_bytes(data)
        tmp.replace(target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(p: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to the file ``p`` atomically; see :func:`write_bytes`.

    >>> import tempfile
    >>> f = os.path.join(tempfile.mkdtemp(), "x.txt")
    >>> write_text(f, "a"); write_text(f, "b"); open(f).read()
    'b'
    """
    write_bytes(p, text.encode("utf-8"))


@contextlib.contextmanager
def staged(workdir: str | os.PathLike) -> Iterator[str]:
    """A local directory standing for ``workdir``: ``workdir`` itself when local; for a URI, a temporary directory
    whose files are copied into ``workdir`` (atomically, one by one) when the block ends without an error.

    For code that writes with local file APIs only (matplotlib, ``open``), e.g. a task's ``final_report``.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> with staged(d) as local:
    ...     local == d
    True
    """
    workdir = resolve(workdir)
    if not is_uri(workdir):
        os.makedirs(workdir, exist_ok=True)
        yield workdir
        return
    local = tempfile.mkdtemp(prefix="mmjax-staged-")
    try:
        yield local
        for root, _, files in os.walk(local):
            rel = os.path.relpath(root, local)
            for name in files:
                parts = [] if rel == "." else rel.split(os.sep)
                with open(os.path.join(root, name), "rb") as f:
                    write_bytes(join(workdir, *parts, name), f.read())
    finally:
        shutil.rmtree(local, ignore_errors=True)


def call_staged(fn, workdir: str | os.PathLike) -> dict:
    """``fn(local_dir) -> dict`` run in :func:`staged` ``(workdir)``; string values naming files under the local
    directory are rewritten to name them in ``workdir``.

    >>> import tempfile
    >>> run = tempfile.mkdtemp()
    >>> out = call_staged(lambda d: {"plot": os.path.join(d, "a.png"), "n": 1}, run)
    >>> out == {"plot": os.path.join(run, "a.png"), "n": 1}
    True
    """
    workdir = resolve(workdir)
    with staged(workdir) as local:
        out = fn(local)
    prefix = local.rstrip(os.sep) + os.sep
    return {
        k: join(workdir, *os.path.relpath(v, local).split(os.sep)) if isinstance(v, str) and v.startswith(prefix) else v
        for k, v in out.items()
    }
