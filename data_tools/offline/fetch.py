"""Fetch the registry packages the offline domains are built from into a cache folder (setup time only).

Debian packages are downloaded with ``apt-get download`` and unpacked with ``dpkg -x`` into
``<cache>/root`` (the same relative paths an ``apt-get install`` would give, but no root install and no
dependencies); npm packages are fetched with ``npm pack`` and unpacked into ``<cache>/npm/<name>``.
Every package gets a marker in ``<cache>/.done/`` once it is fully unpacked, so ``fetch`` is idempotent and
an interrupted fetch is redone for exactly the packages without a marker.
"""
from __future__ import annotations

import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from smat_dist.utils.log import get_logger

log = get_logger("data_tools.offline.fetch")

PACKAGES_FILE = Path(__file__).with_name("packages.txt")


class FetchError(RuntimeError):
    """A package could not be fetched or unpacked; the message names the package and the command."""


@dataclass(frozen=True)
class Package:
    kind: str        # "deb" | "npm"
    name: str        # Debian package name, or npm name without the version
    version: str     # exact npm version; "" for Debian (whatever bookworm currently ships)
    domains: tuple[str, ...]

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}" if self.version else self.name

    @property
    def key(self) -> str:
        """File-system-safe identifier, used for markers and npm unpack folders."""
        return self.name.replace("@", "").replace("/", "__")


def read_packages(path: Path = PACKAGES_FILE) -> list[Package]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ("deb", "npm"):
            raise ValueError(f"{path}:{n}: expected '<deb|npm> <package[@version]> <domains>', got {line!r}")
        kind, spec, domains = parts
        name, version = spec, ""
        if kind == "npm":
            name, sep, version = spec.rpartition("@")
            if not sep or not name:  # "@scope/pkg" without a version: rpartition splits at the scope's '@'
                raise ValueError(f"{path}:{n}: npm package {spec!r} needs an exact version (name@x.y.z)")
        out.append(Package(kind, name, version, tuple(domains.split(","))))
    return out


def packages_for(domains) -> list[Package]:
    want = set(domains)
    return [p for p in read_packages() if want.intersection(p.domains)]


def deb_root(cache_dir) -> Path:
    """Folder the Debian packages are unpacked into (paths as after apt-get install, under this root)."""
    return Path(cache_dir) / "root"


def npm_dir(cache_dir, name: str) -> Path:
    """Folder holding the unpacked npm package ``name`` (its package.json is directly inside)."""
    return Path(cache_dir) / "npm" / name.replace("@", "").replace("/", "__")


def _marker(cache: Path, pkg: Package) -> Path:
    return cache / ".done" / f"{pkg.kind}-{pkg.key}"


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    if shutil.which(cmd[0]) is None:
        raise FetchError(f"cannot fetch {what}: the command {cmd[0]!r} is not installed on this machine")
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        raise FetchError(f"cannot fetch {what}: `{' '.join(cmd)}` timed out after {e.timeout} s") from e
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-6:]
        raise FetchError(f"cannot fetch {what}: `{' '.join(cmd)}` failed (exit {r.returncode}):\n  "
                         + "\n  ".join(tail))
    return r.stdout


def _fetch_debs(cache: Path, pkgs: list[Package]) -> None:
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    names = [p.name for p in pkgs]
    log.info("apt-get download %s", " ".join(names))
    try:
        _run(["apt-get", "download", *names], debs, "Debian package(s) " + ", ".join(names))
    except FetchError:
        # one call for all is fast; on failure retry one by one so the error names the package at fault
        for p in pkgs:
            _run(["apt-get", "download", p.name], debs, f"Debian package {p.name!r} (is `apt-get update` done?)")
    root = deb_root(cache)
    root.mkdir(parents=True, exist_ok=True)
    for p in pkgs:
        found = sorted(debs.glob(f"{p.name}_*.deb"), key=lambda f: f.stat().st_mtime)
        if not found:
            raise FetchError(f"apt-get download {p.name} reported success but no {p.name}_*.deb is in {debs}")
        deb = found[-1]
        _run(["dpkg", "-x", str(deb), str(root)], cache, f"Debian package {p.name!r} (unpacking {deb.name})")
        version = _run(["dpkg-deb", "-f", str(deb), "Version"], cache, f"Debian package {p.name!r}").strip()
        _marker(cache, p).write_text(f"{p.name} {version}\n")
        log.info("unpacked %s %s", p.name, version)


def _fetch_npm(cache: Path, pkgs: list[Package]) -> None:
    tgz_dir = cache / "npm_tgz"
    tgz_dir.mkdir(parents=True, exist_ok=True)
    specs = [p.spec for p in pkgs]
    log.info("npm pack %d package(s): %s", len(specs), " ".join(specs[:6]) + (" ..." if len(specs) > 6 else ""))
    try:
        _run(["npm", "pack", "--silent", "--pack-destination", str(tgz_dir), *specs], cache,
             "npm package(s) " + ", ".join(specs))
    except FetchError:
        for p in pkgs:
            _run(["npm", "pack", "--silent", "--pack-destination", str(tgz_dir), p.spec], cache,
                 f"npm package {p.spec!r}")
    for p in pkgs:
        # npm names the tarball <scope>-<name>-<version>.tgz
        tgz = tgz_dir / f"{p.name.lstrip('@').replace('/', '-')}-{p.version}.tgz"
        if not tgz.exists():
            raise FetchError(f"npm pack {p.spec} reported success but {tgz} does not exist")
        dest = npm_dir(cache, p.name)
        if dest.exists():
            shutil.rmtree(dest)  # a partial unpack from an interrupted run
        tmp = dest.with_name(dest.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            with tarfile.open(tgz, "r:gz") as t:
                t.extractall(tmp, filter="data")  # 'data' refuses absolute paths, links out of tmp, devices
        except (tarfile.TarError, OSError) as e:
            raise FetchError(f"cannot unpack npm package {p.spec} from {tgz}: {e}") from e
        inner = tmp / "package"
        if not (inner / "package.json").exists():
            raise FetchError(f"npm package {p.spec} ({tgz}) has no package/package.json")
        inner.rename(dest)
        shutil.rmtree(tmp)
        _marker(cache, p).write_text(f"{p.spec}\n")


def fetch_packages(domains, cache_dir) -> None:
    """Fetch and unpack every package packages.txt lists for the given domains into ``cache_dir``; skip those
    already there. The domain names are not checked here (this module does not know the domain registry, which
    imports it): ``data_tools.offline.fetch`` (domains.fetch) checks them first."""
    domains = list(domains)
    # Absolute: apt-get download and npm pack run in sub-folders, so a relative cache path would point
    # somewhere else for the next command.
    cache = Path(cache_dir).resolve()
    (cache / ".done").mkdir(parents=True, exist_ok=True)
    todo = [p for p in packages_for(domains) if not _marker(cache, p).exists()]
    if not todo:
        log.info("offline packages for %s already in %s", ",".join(domains), cache)
        return
    debs = [p for p in todo if p.kind == "deb"]
    npms = [p for p in todo if p.kind == "npm"]
    if debs:
        _fetch_debs(cache, debs)
    if npms:
        _fetch_npm(cache, npms)
    # downloaded archives are no longer needed once unpacked (the markers say what is there)
    shutil.rmtree(cache / "debs", ignore_errors=True)
    shutil.rmtree(cache / "npm_tgz", ignore_errors=True)
    log.info("fetched %d package(s) into %s", len(todo), cache)


def require(cache_dir, domain: str) -> None:
    """Raise a clear error when the packages a domain needs have not been fetched into ``cache_dir``."""
    cache = Path(cache_dir)
    missing = [p.spec for p in packages_for([domain]) if not _marker(cache, p).exists()]
    if missing:
        raise FetchError(f"offline domain {domain!r} needs package(s) {', '.join(missing)} in {cache}; "
                         f"run fetch([{domain!r}], {str(cache)!r}) (or `smat-convert offline:{domain}`) first")
