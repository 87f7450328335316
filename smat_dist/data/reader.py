"""Read exactly the encoded images an episode needs, using the byte offsets in spec.json.

- local folder: seek + read on the shard file; open handles are kept in a small LRU per process (a data
  worker never holds more than ``max_handles`` files, unlike P>M>F's leaked h5 handles) and closed by
  ``close()``, which the episode loader registers to run when a worker exits;
- http(s): one HTTP Range request per image (timeout and bounded retries: smat_dist/data/remote.py); a
  server without byte ranges is refused when the stream opens, before the first episode;
- pipe: the shard is streamed through WebDataset's tar iterator and only the needed keys are kept; since a
  class is contiguous in its shard, the stream is closed as soon as the last needed key has passed.
Short reads (a truncated shard) raise ShardError naming the shard and class; ``check_shard_sizes`` finds a
truncated or replaced shard up front from the sizes spec.json records (a stat per local shard).
"""
from __future__ import annotations

import os
import urllib.error
from collections import OrderedDict

from smat_dist.utils.log import get_logger

from .remote import RemotePolicy, request
from .spec import DatasetSpec, location_kind

log = get_logger("data.reader")


class ShardError(OSError):
    """A shard that is missing, truncated or unreadable; the message names the shard and class."""


class CorruptImageError(OSError):
    """An image whose bytes were read but do not decode; the message names the member and shard."""


def _remote_size(url: str, policy: RemotePolicy | None = None) -> int | None:
    """Content-Length of an HTTP HEAD, or None when the server does not say."""
    n = request(url, lambda r: r.headers.get("Content-Length"), method="HEAD", policy=policy)
    return int(n) if n is not None and n.isdigit() else None


def check_byte_ranges(spec: DatasetSpec, policy: RemotePolicy | None = None) -> None:
    """Refuse an http(s) dataset whose server ignores Range requests, before the first episode: every image is
    one Range request, and a server answering 200 would send whole shards (we never download them)."""
    if location_kind(spec.location) != "http" or not spec.shards:
        return
    url = spec.shard_url(next(iter(spec.shards)))
    try:
        status = request(url, lambda r: r.status, headers={"Range": "bytes=0-0"}, policy=policy)
    except (OSError, urllib.error.URLError) as e:
        raise ShardError(f"cannot read shard {url} (dataset {spec.name}): {e}") from e
    if status != 206:
        raise ShardError(f"shard {url} (dataset {spec.name}): server answered {status} to a Range request; it must "
                         "support byte ranges (HTTP 206): serve the folder with a server that does (nginx, Apache, "
                         "S3, `rclone serve http`), or copy the dataset to a local folder")


def check_shard_sizes(spec: DatasetSpec, policy: RemotePolicy | None = None) -> int:
    """Compare every shard's size with the ``bytes`` spec.json records for it; raise ShardError naming the
    first shard that is missing or has another size (and the classes it holds). Local folders: one stat per
    shard; http(s): one HEAD per shard; pipe: sources cannot be sized without reading them and are not
    checked. A spec written before sizes were recorded cannot be verified (logged). Returns the number of
    shards checked."""
    kind = location_kind(spec.location)
    if kind == "pipe":
        log.info("%s: shard sizes not checked at start-up (pipe: source; `smat-convert --verify` reads them)",
                 spec.name)
        return 0
    unsized = [f for f, s in spec.shards.items() if not isinstance(s.get("bytes"), int)]
    if unsized:
        log.warning("%s: cannot verify the shard sizes: %s records no size for %d shard(s) (written by an "
                    "older smat-convert)", spec.name, spec.spec_path, len(unsized))
    checked = 0
    for fname, s in spec.shards.items():
        want = s.get("bytes")
        if not isinstance(want, int):
            continue
        url = spec.shard_url(fname)
        try:
            got = os.stat(url).st_size if kind == "local" else _remote_size(url, policy)
        except FileNotFoundError as e:
            raise ShardError(f"missing shard {url} (dataset {spec.name}, {_held(spec, fname)}); re-run "
                             f"smat-convert for this dataset") from e
        except (OSError, urllib.error.URLError) as e:
            raise ShardError(f"cannot check shard {url} (dataset {spec.name}): {e}") from e
        if got is None:
            continue
        checked += 1
        if got != want:
            what = "truncated" if got < want else "changed"
            raise ShardError(f"{what} shard {url} (dataset {spec.name}, {_held(spec, fname)}): it is {got} bytes, "
                             f"{spec.spec_path} records {want}; re-run smat-convert for this dataset "
                             f"(`smat-convert --verify {spec.location}` lists every damaged image)")
    return checked


def _held(spec: DatasetSpec, fname: str) -> str:
    names = [c.name for c in spec.classes.values() if c.shard == fname]
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"class{'es' if len(names) != 1 else ''} {', '.join(repr(n) for n in names[:3])}{more}"


def member_key(label: int, i: int) -> str:
    return f"c{label:05d}_{i:06d}"


class ShardReader:
    def __init__(self, max_handles: int = 4, policy: RemotePolicy | None = None):
        if max_handles < 1:
            raise ValueError("max_handles must be >= 1")
        self.max_handles = max_handles
        self.policy = policy or RemotePolicy()
        self._handles: OrderedDict[str, object] = OrderedDict()

    # Handles are per process: a reader pickled into a DataLoader worker starts with none.
    def __getstate__(self):
        return {"max_handles": self.max_handles, "policy": self.policy}

    def __setstate__(self, state):
        self.__init__(state["max_handles"], state.get("policy"))

    @property
    def open_handles(self) -> int:
        return len(self._handles)

    def close(self) -> None:
        while self._handles:
            _, f = self._handles.popitem(last=False)
            f.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing useful to do
            pass

    def _handle(self, path: str):
        f = self._handles.get(path)
        if f is not None:
            self._handles.move_to_end(path)
            return f
        f = open(path, "rb", buffering=0)
        self._handles[path] = f
        if len(self._handles) > self.max_handles:
            _, old = self._handles.popitem(last=False)
            old.close()
        return f

    def read(self, spec: DatasetSpec, label: int, ids: list[int]) -> list[bytes]:
        """Encoded bytes of members ``ids`` (indices within the class) of class ``label``, in that order."""
        cls = spec.classes[label]
        for i in ids:
            if not 0 <= i < cls.count:
                raise IndexError(f"{spec.name}: class {cls.name!r} has {cls.count} images, no member {i}")
        url = spec.shard_url(cls.shard)
        kind = location_kind(spec.location)
        if kind == "local":
            return self._read_local(spec, url, label, ids)
        if kind == "http":
            return [self._read_http(spec, url, label, i) for i in ids]
        return self._read_pipe(spec, url, label, ids)

    def read_classes(self, spec: DatasetSpec, requests: list[tuple[int, list[int]]]) -> list[list[bytes]]:
        """``read`` for several classes at once. For pipe: shards this streams each shard once for all the
        classes it holds (an episode's classes often share a shard), instead of once per class."""
        if location_kind(spec.location) != "pipe":
            return [self.read(spec, label, ids) for label, ids in requests]
        by_shard: dict[str, list[tuple[int, list[int]]]] = {}
        for label, ids in requests:
            for i in ids:
                if not 0 <= i < spec.classes[label].count:
                    raise IndexError(f"{spec.name}: class {spec.classes[label].name!r} has "
                                     f"{spec.classes[label].count} images, no member {i}")
            by_shard.setdefault(spec.classes[label].shard, []).append((label, ids))
        got: dict[int, list[bytes]] = {}
        for shard, reqs in by_shard.items():
            got.update(self._read_pipe_many(spec, spec.shard_url(shard), reqs))
        return [got[label] for label, _ in requests]

    def _where(self, spec, url, label, i) -> str:
        cls = spec.classes[label]
        return f"shard {url} (dataset {spec.name}, class {cls.name!r}, member {member_key(label, i)})"

    def _read_local(self, spec, path, label, ids) -> list[bytes]:
        cls = spec.classes[label]
        try:
            f = self._handle(path)
        except OSError as e:
            raise ShardError(f"cannot open shard {path} (dataset {spec.name}, class {cls.name!r}): {e}") from e
        out = []
        for i in ids:
            off, size, _ = cls.members[i]
            data = os.pread(f.fileno(), size, off)
            if len(data) != size:
                raise ShardError(f"truncated {self._where(spec, path, label, i)}: expected {size} bytes at offset "
                                 f"{off}, got {len(data)} (file is {os.fstat(f.fileno()).st_size} bytes); "
                                 f"re-run smat-convert for this dataset")
            out.append(data)
        return out

    def _read_http(self, spec, url, label, i) -> bytes:
        off, size, _ = spec.classes[label].members[i]

        def body(r):
            if r.status != 206:
                # A server that ignores Range would send the whole shard: refuse rather than download it.
                raise ShardError(f"{self._where(spec, url, label, i)}: server answered {r.status} to a Range "
                                 f"request; it must support byte ranges (HTTP 206)")
            return r.read()

        try:
            data = request(url, body, headers={"Range": f"bytes={off}-{off + size - 1}"}, policy=self.policy)
        except urllib.error.HTTPError as e:
            raise ShardError(f"{self._where(spec, url, label, i)}: HTTP {e.code}") from e
        except urllib.error.URLError as e:
            raise ShardError(f"{self._where(spec, url, label, i)}: {e.reason}") from e
        if len(data) != size:
            raise ShardError(f"truncated {self._where(spec, url, label, i)}: expected {size} bytes, got {len(data)}")
        return data

    def _read_pipe(self, spec, url, label, ids) -> list[bytes]:
        return self._read_pipe_many(spec, url, [(label, ids)])[label]

    def _read_pipe_many(self, spec, url, requests) -> dict[int, list[bytes]]:
        import webdataset as wds
        from webdataset.tariterators import tar_file_iterator

        wanted: dict[str, tuple[int, int]] = {}
        for label, ids in requests:
            cls = spec.classes[label]
            wanted.update({f"{member_key(label, i)}.{cls.members[i][2]}": (label, i) for i in ids})
        found: dict[tuple[int, int], bytes] = {}
        names = ", ".join(repr(spec.classes[lab].name) for lab, _ in requests[:3])
        if wanted:
            stream = wds.gopen(url)
            try:
                for sample in tar_file_iterator(stream, select_files=lambda n: n in wanted):
                    found[wanted[sample["fname"]]] = sample["data"]
                    if len(found) == len(wanted):
                        break  # the rest of the shard is not needed: stop the pipe early
            except Exception as e:
                raise ShardError(f"cannot stream shard {url} (dataset {spec.name}, class {names}): {e}") from e
            finally:
                try:
                    stream.close()
                except Exception:  # the command was cut off on purpose (broken pipe); its status is irrelevant
                    pass
        out = {}
        for label, ids in requests:
            missing = [i for i in ids if (label, i) not in found]
            if missing:
                raise ShardError(f"truncated {self._where(spec, url, label, missing[0])}: the stream ended before "
                                 f"{len(missing)} needed member(s) of the class; re-run smat-convert for this dataset")
            out[label] = [found[(label, i)] for i in ids]
        return out
