"""A stand-in for Google Cloud Storage in tests: ``gs://BUCKET/...`` paths stored under a local directory.

Only the transport is replaced, at the points where the libraries leave Python for the network: etils.epath's
``gs`` backend (every file operation of mmjax and orbax), TensorStore's GCS kvstore spec that orbax builds for array
data (a ``file`` kvstore under the same directory instead), orbax's bucket lookup (a bucket without hierarchical
namespace) and tensorboardX's ``gs`` record-writer factory. Everything above them - orbax's GCS code paths (commit
marker files instead of renames), mmjax's path handling - runs as it does against a real bucket. Like an object
store, the stand-in cannot append to a file.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from etils.epath import backend as epath_backend
from etils.epath import gpath

PREFIX = "gs://"


class BucketBackend(epath_backend._OsPathBackend):
    """etils.epath backend: ``gs://b/x`` lives at ``root/b/x``; appending is refused, as on GCS."""

    def __init__(self, root: str):
        self.root = root

    def local(self, p) -> str:
        p = os.fspath(p)
        if p.startswith(self.root + os.sep):  # the base class calls its own methods with mapped paths
            return p
        if not p.startswith(PREFIX):
            raise ValueError(f"not a gs:// path: {p!r}")
        return os.path.join(self.root, p[len(PREFIX) :])

    def uri(self, local) -> str:
        return PREFIX + os.path.relpath(os.fspath(local), self.root)

    def open(self, path, mode):
        if "a" in mode or "+" in mode:
            raise NotImplementedError(f"object stores cannot append or update in place (mode {mode!r}: {path})")
        return super().open(self.local(path), mode)

    def exists(self, path):
        return super().exists(self.local(path))

    def isdir(self, path):
        return super().isdir(self.local(path))

    def listdir(self, path):
        return super().listdir(self.local(path))

    def glob(self, path):
        return [self.uri(p) for p in super().glob(self.local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in super().walk(self.local(top), top_down=top_down, on_error=on_error):
            yield self.uri(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        return super().makedirs(self.local(path), exist_ok=exist_ok, mode=mode)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        return super().mkdir(self.local(path), exist_ok=exist_ok, mode=mode)

    def rmtree(self, path):
        return super().rmtree(self.local(path))

    def remove(self, path):
        return super().remove(self.local(path))

    def rename(self, path, dst):
        return super().rename(self.local(path), self.local(dst))

    def replace(self, path, dst):
        return super().replace(self.local(path), self.local(dst))

    def copy(self, path, dst, overwrite):
        return super().copy(self.local(path), self.local(dst), overwrite=overwrite)

    def stat(self, path):
        return super().stat(self.local(path))


class _RecordWriterFactory:
    """tensorboardX's writer factory for ``gs://`` event files, writing under the stand-in's directory."""

    def __init__(self, backend: BucketBackend):
        self.backend = backend

    def open(self, path):
        local = self.backend.local(path)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        return open(local, "wb")

    def directory_check(self, path):
        pass  # object stores need no directories


def install(monkeypatch, root: str) -> BucketBackend:
    """Routes ``gs://`` to ``root`` for the rest of the test (``monkeypatch`` undoes it); returns the backend."""
    from orbax.checkpoint._src.path import gcs_utils
    from tensorboardX import record_writer

    bucket_backend = BucketBackend(root)
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", bucket_backend)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", lambda p: {"driver": "file", "path": bucket_backend.local(p)})
    monkeypatch.setattr(gcs_utils, "get_bucket", lambda name: SimpleNamespace(hierarchical_namespace_enabled=False))
    monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs", _RecordWriterFactory(bucket_backend))
    return bucket_backend
