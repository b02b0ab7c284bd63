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
from urllib.parse import urlsplit

from lmeraser.errors import reason, without_credentials
from lmeraser.versioning import cache_dir, dvc_repo, local_path, remotes
from lmeraser.workspace import Workspace


class Store:
    """A place that holds files: listed, read one file at a time, and (for the purge) deleted from."""

    label: str
    root: str  # what the scan index binds a location's entries to (a path, or a URL and endpoint)
    elsewhere = True  # not a directory on this machine: a failure makes it "not searched", and records name it

    def listing(self) -> list[tuple[str, list | None]]:
        """Every file as (path relative to the store's root, its identity or None: read it every
        time). Raises when the store cannot be listed."""
        raise NotImplementedError

    def local(self, rel: str) -> contextlib.AbstractContextManager[Path]:
        """The file's bytes as a path on this machine, for as long as the context lasts.

        Args:
            rel: the file's path relative to the store's root, as `listing` gives it.
        """
        raise NotImplementedError

    def delete(self, rel: str) -> None:
        """Delete one file from the store (the purge's superseded artifact copies).

        Args:
            rel: the file's path relative to the store's root, as `listing` gives it.
        """
        raise NotImplementedError

    def describe(self) -> dict:
        """What a record says of this store: its kind and where it is, no credentials."""
        raise NotImplementedError

    def where(self, rel: str) -> str:
        """A file's location as a person looks for it (a path, or the object's URL).

        Args:
            rel: the file's path relative to the store's root, as `listing` gives it.
        """
        raise NotImplementedError


@dataclass
class DirectoryStore(Store):
    label: str
    path: Path
    elsewhere = False  # a failure here is this machine's problem: it raises
    skipped = ()  # links the last listing did not follow, with why

    @property
    def root(self) -> str:
        # Absolute and resolved: `lmeraser audit scan --full` in the workspace named its stores
        # relatively ("data"), a batch through the service absolutely, so each answered nothing
        # from the other's index and read every file again (the first forget after a scheduled
        # full scan: 753 files, verify 8.5 s instead of ~2 s at 30,000 samples).
        return str(self.path.resolve())

    def listing(self) -> list[tuple[str, list | None]]:
        """As `Store.listing`. A symbolic link to a regular file is searched through (what it
        leads to is what a reader of the store gets; its identity is the link's and the target's);
        any other link (to a directory, a FIFO, a device, nowhere) is not followed, and `skipped`
        names it, for the report's "not searched", as it names a FIFO, socket or device itself."""
        import stat as stat_mode

        from lmeraser.io import file_identity as identity

        found, self.skipped = [], []
        if self.path.exists():
            for base, dirs, names in os.walk(self.path):
                for name, is_dir in [*((n, False) for n in names), *((d, True) for d in dirs)]:
                    path = Path(base) / name
                    rel = os.path.relpath(path, self.path)
                    try:
                        own = path.lstat()
                        if not stat_mode.S_ISLNK(own.st_mode):
                            if not is_dir and stat_mode.S_ISREG(own.st_mode):
                                found.append((rel, identity(own)))  # stat before the read
                            elif not is_dir:  # a FIFO, a socket, a device: never read (it could block)
                                self.skipped.append(f"{rel} (no regular file, not read)")
                            continue
                        target = path.stat()
                    except OSError:
                        self.skipped.append(f"{rel} (a symbolic link that leads nowhere)")
                        continue
                    if stat_mode.S_ISREG(target.st_mode):
                        found.append((rel, identity(own) + identity(target)))
                    else:
                        kind = "a directory" if stat_mode.S_ISDIR(target.st_mode) else "no regular file"
                        self.skipped.append(f"{rel} (a symbolic link to {kind}, not followed)")
        return found

    @contextlib.contextmanager
    def local(self, rel: str) -> Iterator[Path]:
        """As `Store.local`: the file itself, no copy.

        Args:
            rel: the file's path relative to the directory.
        """
        yield self.path / rel

    def delete(self, rel: str) -> None:
        """As `Store.delete`: the file is unlinked.

        Args:
            rel: the file's path relative to the directory.
        """
        (self.path / rel).unlink()

    def describe(self) -> dict:
        return {"kind": "directory", "path": str(self.path)}

    def where(self, rel: str) -> str:
        """As `Store.where`: the file's path on this machine.

        Args:
            rel: the file's path relative to the directory.
        """
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
class S3RemoteStore(_Scratch, Store):
    """A DVC remote on S3 (or an S3-compatible server), through the s3fs filesystem DVC builds for
    it (dvc-s3: DVC's credentials, endpoint and options). Each object is read by its exact key
    (no path parsing: a key may contain `?versionId=`) and only if its ETag is still the one
    listed (IfMatch), so what the scan index keeps for an object is what that object held."""

    label: str
    url: str
    fs: object = field(repr=False)  # s3fs.S3FileSystem
    path: str = ""  # bucket/prefix as DVC names the remote's root
    endpoint: str | None = None

    @property
    def root(self) -> str:
        return (
            f"{without_credentials(self.url)} @ "
            f"{without_credentials(self.endpoint) if self.endpoint else 'default endpoint'}"
        )

    def _bucket_prefix(self) -> tuple[str, str]:
        bucket, _, prefix = self.path.partition("/")
        return bucket, prefix.strip("/")

    def listing(self) -> list[tuple[str, list | None]]:
        from fsspec.asyn import sync

        bucket, prefix = self._bucket_prefix()
        self._etags: dict[str, str] = {}
        files = []

        async def pages() -> None:
            token = None
            while True:
                kwargs = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else ""} | (
                    {"ContinuationToken": token} if token else {}
                )
                page = await self.fs._call_s3("list_objects_v2", **kwargs)
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    rel = key[len(kwargs["Prefix"]) :]
                    self._etags[rel] = obj["ETag"]
                    files.append((rel, [obj["ETag"], int(obj["Size"]), obj["LastModified"].isoformat()]))
                if not page.get("IsTruncated"):
                    return
                token = page["NextContinuationToken"]

        sync(self.fs.loop, pages)
        return sorted(files)

    @contextlib.contextmanager
    def local(self, rel: str) -> Iterator[Path]:
        """As `Store.local`: a scratch copy of the object, fetched only if its ETag is still the one listed.

        Args:
            rel: the object's key relative to the remote's root, as `listing` gave it (which must have run).
        """
        from fsspec.asyn import sync

        bucket, prefix = self._bucket_prefix()
        key = f"{prefix}/{rel}" if prefix else rel

        async def get(target: Path) -> None:
            answer = await self.fs._call_s3("get_object", Bucket=bucket, Key=key, IfMatch=self._etags[rel])
            async with answer["Body"] as body:
                with open(target, "wb") as out:
                    while chunk := await body.read(1 << 20):
                        out.write(chunk)

        with self._scratch() as directory:
            target = directory / "object"
            sync(self.fs.loop, get, target)  # a 412 (changed since listed) raises: the store is not searched
            yield target

    def delete(self, rel: str) -> None:
        """As `Store.delete`: the object is deleted by its exact key.

        Args:
            rel: the object's key relative to the remote's root.
        """
        from fsspec.asyn import sync

        bucket, prefix = self._bucket_prefix()
        sync(self.fs.loop, self.fs._call_s3, "delete_object", Bucket=bucket, Key=f"{prefix}/{rel}" if prefix else rel)

    def describe(self) -> dict:
        bucket, prefix = self._bucket_prefix()
        endpoint = without_credentials(self.endpoint) if self.endpoint else None
        return {"kind": "dvc remote (s3)", "bucket": bucket, "prefix": prefix, "endpoint": endpoint}

    def where(self, rel: str) -> str:
        """As `Store.where`: the object's URL under the remote's, without credentials.

        Args:
            rel: the object's key relative to the remote's root.
        """
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
        """As `Store.local`: a scratch copy downloaded through MLflow's artifact repository.

        Args:
            rel: the artifact's path relative to the location's URI, as `listing` gives it.
        """
        with self._scratch() as directory:
            target = directory / "artifact"
            # This one file (download_artifacts would take a folder of the same name instead).
            self._repository()._download_file(rel, str(target))
            yield target

    def delete(self, rel: str) -> None:
        """As `Store.delete`: through MLflow's artifact repository.

        Args:
            rel: the artifact's path relative to the location's URI.
        """
        self._repository().delete_artifacts(rel)

    def describe(self) -> dict:
        return {
            "kind": "mlflow artifacts",
            "artifact_uri": without_credentials(self.uri),
            "tracking_uri": without_credentials(self.tracking_uri),
        }

    def where(self, rel: str) -> str:
        """As `Store.where`: the artifact's URI, without credentials.

        Args:
            rel: the artifact's path relative to the location's URI.
        """
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
                scheme = url.split("://")[0].lower()
                if scheme != "s3":  # an HTTP remote cannot be listed; other clouds are not tested here
                    not_searched.append(
                        f"{label} ({without_credentials(url)}): the scan reads S3 remotes; "
                        f"a {scheme} remote is purged by DVC, not read back"
                    )
                    continue
                try:
                    remote = repo.cloud.get_remote(name)
                    endpoint = repo.config["remote"][name].get("endpointurl") or os.environ.get("AWS_ENDPOINT_URL")
                    store = S3RemoteStore(label, url, remote.fs.fs, remote.path, endpoint)
                except Exception as error:  # noqa: BLE001 - a missing plugin or a bad config: a gap to report
                    not_searched.append(f"{label} ({without_credentials(url)}): DVC cannot open it ({reason(error)})")
                    continue
                stores.append(store)
    return stores, not_searched


def storage_locations(ws: Workspace) -> Locations:
    """Every place the stores keep bytes, asked of the stores themselves: data/, the DVC cache
    (`dvc cache dir`) and every DVC remote (`dvc remote list`), the prompt store, and every MLflow
    experiment's artifact location (MlflowClient), wherever they are.

    Args:
        ws: the workspace whose data/, DVC cache and remotes, prompt store and MLflow tracking store are listed.
    """
    from lmeraser import tracking

    stores: list[Store] = [
        DirectoryStore("data", ws.data),
        DirectoryStore("dvc cache", cache_dir(ws.root)),
        DirectoryStore("artifact store", ws.artifacts),
    ]
    remote_stores, not_searched = _dvc_remote_stores(ws)
    stores += remote_stores
    tracking_uri = tracking.tracking_uri(ws)
    try:
        locations = tracking.artifact_locations(ws)
    except Exception as error:  # noqa: BLE001 - an unreachable tracking server is a gap to report, not a crash
        locations = {}
        not_searched.append(
            f"MLflow tracking store at {without_credentials(tracking_uri)}: unreachable ({reason(error)})"
        )
    served = urlsplit(tracking_uri).scheme not in ("", "file", "sqlite")  # a tracking server
    for label, uri in locations.items():
        path = local_path(ws.root, uri)
        if path is None:
            stores.append(MlflowArtifactStore(label, uri, tracking_uri))
        elif served:
            # A path a tracking server reports is on its disk, not this machine's: never walk ours.
            not_searched.append(
                f"{label} ({path}): a path on the tracking server's own disk, "
                "not reachable through MLflow's artifact API"
            )
        else:
            stores.append(DirectoryStore(label, path))
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
