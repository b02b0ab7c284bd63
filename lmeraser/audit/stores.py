"""The stores where copies of people's data can live, each listed and read through its own API.

`audit scan` and the purge work on a list of stores rather than of directories:
- a directory on this machine: data/, the DVC cache, a local DVC remote, the prompt store, a local
  MLflow artifact root (os.walk; a file's identity is its stat: device, inode, size, mtime, ctime);
- a DVC remote elsewhere (S3 and S3-compatible, or any kind DVC has a plugin for): listed and read
  through DVC's own filesystem for that remote, with the credentials and endpoint DVC's config
  gives it (an object's identity is its ETag, size and last-modified time, which the server sets);
- an MLflow artifact location that is not a directory here (a tracking server's proxied artifacts,
  `mlflow-artifacts:/`, or an object store): listed, read and deleted through MLflow's artifact
  repository, as the tracking client reaches it. MLflow's listing gives a size and no modification
  time, so these files have no identity and are read on every scan (the scan index cannot vouch
  for them).
A store that cannot be listed (no credentials, no permission, unreachable) is "not searched", with
the reason, and never silently skipped. What a record says of a store (`describe`) names the
endpoint and bucket or the tracking URI, never a credential.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from lmeraser.versioning import cache_dir, dvc_repo, local_path, remotes
from lmeraser.workspace import Workspace


def without_credentials(url: str) -> str:
    """`url` with any user:password@ part removed (records and logs name stores, never secrets)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    return urlunsplit((parts.scheme, host + (f":{parts.port}" if parts.port else ""), parts.path, parts.query, parts.fragment))


def reason(error: BaseException) -> str:
    """One line on why a store could not be listed or read (no credential is ever in it: the
    error classes of boto, DVC and MLflow name what failed, and the URL is stripped)."""
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{error.__class__.__name__}: {first}" if first else error.__class__.__name__


class Store:
    """A place that holds files: listed, read one file at a time, and (for the purge) deleted from."""

    label: str
    root: str  # what the scan index binds a location's entries to (a path, or a URL and endpoint)

    def listing(self) -> list[tuple[str, list | None]]:
        """Every file as (path relative to the store's root, its identity or None: read it every
        time). Raises when the store cannot be listed."""
        raise NotImplementedError

    def local(self, rel: str) -> contextlib.AbstractContextManager[Path]:
        """The file's bytes as a path on this machine, for as long as the context lasts."""
        raise NotImplementedError

    def delete(self, rel: str) -> None:
        raise NotImplementedError

    def describe(self) -> dict:
        """What a record says of this store: its kind and where it is, no credentials."""
        raise NotImplementedError

    def where(self, rel: str) -> str:
        """A file's location as a person looks for it (a path, or the object's URL)."""
        raise NotImplementedError


@dataclass
class DirectoryStore(Store):
    label: str
    path: Path

    @property
    def root(self) -> str:
        return str(self.path)

    def listing(self) -> list[tuple[str, list | None]]:
        from lmeraser.audit.scan_index import identity

        found = []
        if self.path.exists():
            for base, _, names in os.walk(self.path):
                for name in names:
                    path = Path(base) / name
                    if path.is_file() and not path.is_symlink():
                        found.append((os.path.relpath(path, self.path), identity(path.stat())))  # stat before the read
        return found

    @contextlib.contextmanager
    def local(self, rel: str) -> Iterator[Path]:
        yield self.path / rel

    def delete(self, rel: str) -> None:
        (self.path / rel).unlink()

    def describe(self) -> dict:
        return {"kind": "directory", "path": str(self.path)}

    def where(self, rel: str) -> str:
        return str(self.path / rel)


class _Scratch:
    """Remote files are read through a scratch copy that is removed at once."""

    @contextlib.contextmanager
    def _scratch(self) -> Iterator[Path]:
        directory = Path(tempfile.mkdtemp(prefix="lmeraser-scan-"))
        try:
            yield directory
        finally:
            shutil.rmtree(directory, ignore_errors=True)


@dataclass
class DvcRemoteStore(_Scratch, Store):
    """A DVC remote that is not a directory here, through DVC's filesystem for it (dvc-s3 for S3)."""

    label: str
    name: str
    url: str
    fs: object = field(repr=False)  # DVC's filesystem for the remote (dvc_objects FileSystem)
    path: str = ""  # the remote's root as the filesystem names it (bucket/prefix)
    endpoint: str | None = None

    @property
    def root(self) -> str:
        return f"{without_credentials(self.url)} @ {without_credentials(self.endpoint) if self.endpoint else 'default endpoint'}"

    def listing(self) -> list[tuple[str, list | None]]:
        found = self.fs.fs.find(self.path, detail=True)
        prefix = self.path.rstrip("/") + "/"
        files = []
        for key, info in sorted(found.items()):
            if info.get("type", "file") != "file":
                continue
            modified = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
            etag = info.get("ETag") or info.get("etag") or info.get("md5")
            # Without a server-set change marker, the object is read every time.
            ident = [str(etag), int(info.get("size") or 0), str(modified)] if etag and modified else None
            files.append((key[len(prefix) :] if key.startswith(prefix) else key, ident))
        return files

    @contextlib.contextmanager
    def local(self, rel: str) -> Iterator[Path]:
        with self._scratch() as directory:
            target = directory / "object"
            self.fs.fs.get_file(f"{self.path.rstrip('/')}/{rel}", str(target))
            yield target

    def delete(self, rel: str) -> None:
        self.fs.fs.rm_file(f"{self.path.rstrip('/')}/{rel}")

    def describe(self) -> dict:
        scheme = self.url.split("://")[0]
        parts = urlsplit(self.url)
        endpoint = without_credentials(self.endpoint) if self.endpoint else None
        return {"kind": f"dvc remote ({scheme})", "bucket": parts.netloc, "prefix": parts.path.lstrip("/"), "endpoint": endpoint}

    def where(self, rel: str) -> str:
        return f"{without_credentials(self.url).rstrip('/')}/{rel}"


@dataclass
class MlflowArtifactStore(_Scratch, Store):
    """An MLflow artifact location that is not a directory here, through MLflow's artifact repository."""

    label: str
    uri: str
    tracking_uri: str

    @property
    def root(self) -> str:
        return f"{without_credentials(self.uri)} @ {without_credentials(self.tracking_uri)}"

    def _repository(self):
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        # A proxied location (mlflow-artifacts:/) resolves against the tracking server.
        return get_artifact_repository(self.uri, tracking_uri=self.tracking_uri)

    def listing(self) -> list[tuple[str, list | None]]:
        repository, files, pending = self._repository(), [], [None]
        while pending:
            directory = pending.pop()
            for info in repository.list_artifacts(directory):
                if info.is_dir:
                    pending.append(info.path)
                else:
                    files.append((info.path, None))  # MLflow gives no modification time: read every time
        return sorted(files)

    @contextlib.contextmanager
    def local(self, rel: str) -> Iterator[Path]:
        with self._scratch() as directory:
            yield Path(self._repository().download_artifacts(rel, dst_path=str(directory)))

    def delete(self, rel: str) -> None:
        self._repository().delete_artifacts(rel)

    def describe(self) -> dict:
        return {"kind": "mlflow artifacts", "artifact_uri": without_credentials(self.uri), "tracking_uri": without_credentials(self.tracking_uri)}

    def where(self, rel: str) -> str:
        return f"{without_credentials(self.uri).rstrip('/')}/{rel}"


@dataclass
class Locations:
    stores: dict[str, Store]  # searched (and purged)
    not_searched: list[str]  # where copies may be that cannot be read from here, with why


def _dvc_remote_stores(ws: Workspace) -> tuple[list[Store], list[str]]:
    stores: list[Store] = []
    not_searched = []
    elsewhere = {}
    for name, url in remotes(ws.root).items():
        path = local_path(ws.root, url)
        if path is not None:
            stores.append(DirectoryStore(f"dvc remote '{name}'", path))
        else:
            elsewhere[name] = url
    if elsewhere:
        with dvc_repo(ws.root) as repo:
            for name, url in elsewhere.items():
                label = f"dvc remote '{name}'"
                try:
                    remote = repo.cloud.get_remote(name)
                    endpoint = repo.config["remote"][name].get("endpointurl") or os.environ.get("AWS_ENDPOINT_URL")
                    store = DvcRemoteStore(label, name, url, remote.fs, remote.path, endpoint)
                except Exception as error:  # noqa: BLE001 - a missing plugin or a bad config: a gap to report
                    not_searched.append(f"{label} ({without_credentials(url)}): DVC cannot open it ({reason(error)})")
                    continue
                stores.append(store)
    return stores, not_searched


def storage_locations(ws: Workspace) -> Locations:
    """Every place the stores keep bytes, asked of the stores themselves: data/, the DVC cache
    (`dvc cache dir`) and every DVC remote (`dvc remote list`), the prompt store, and every MLflow
    experiment's artifact location (MlflowClient), wherever they are."""
    from lmeraser import tracking

    stores: list[Store] = [DirectoryStore("data", ws.data), DirectoryStore("dvc cache", cache_dir(ws.root)), DirectoryStore("artifact store", ws.artifacts)]
    remote_stores, not_searched = _dvc_remote_stores(ws)
    stores += remote_stores
    try:
        locations = tracking.artifact_locations(ws)
    except Exception as error:  # noqa: BLE001 - an unreachable tracking server is a gap to report, not a crash
        locations = {}
        not_searched.append(f"MLflow tracking store at {without_credentials(tracking.tracking_uri(ws))}: unreachable ({reason(error)})")
    for label, uri in locations.items():
        path = local_path(ws.root, uri)
        stores.append(DirectoryStore(label, path) if path is not None else MlflowArtifactStore(label, uri, tracking.tracking_uri(ws)))
    for label, path in (("mlflow artifacts", ws.mlflow_artifacts), ("mlflow (default root)", ws.mlflow_default_root)):
        if label not in {s.label for s in stores}:
            stores.append(DirectoryStore(label, path))
    # Each directory is searched once: under its first name, and not again inside another.
    directories: dict[str, Path] = {}
    kept: dict[str, Store] = {}
    for store in stores:
        if isinstance(store, DirectoryStore):
            resolved = store.path.resolve()
            if resolved in directories.values():
                continue
            directories[store.label] = resolved
        kept[store.label] = store
    nested = {a for a, p in directories.items() for q in directories.values() if q in p.parents}
    return Locations({label: s for label, s in kept.items() if label not in nested}, not_searched)
