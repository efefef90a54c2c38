"""JavaScript client libraries from npm, vendored for the browser tests at pinned versions.

``bundle("hls.js")`` is the path of a file the test pages load unmodified.
Each package is fetched once with ``npm pack <name>@<version>`` (never a
range), checked against the pinned ``sha512`` integrity, and its browser
files extracted under ``.cache/browser-libs/<name>@<version>/`` in the
repository (``BROWSER_LIBS_CACHE`` overrides the place). After that no
network is needed: a run with the cache filled works offline. Without npm,
or with the registry out of reach and nothing cached, the caller's test
skips, saying why; a tarball that does not match its pin fails.

Run it as a script (``python -m tests.browser_libs``) to fill the cache ahead.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("BROWSER_LIBS_CACHE", ROOT / ".cache" / "browser-libs"))
NPM_TIMEOUT_S = 180


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    #: the registry's ``dist.integrity`` for this version (``npm view NAME@VERSION dist.integrity``)
    integrity: str
    #: files the pages load, relative to the package root; the first is :func:`bundle`'s answer
    files: tuple[str, ...]

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def directory(self) -> Path:
        return CACHE / self.spec.replace("/", "+")


PACKAGES = {
    package.name: package
    for package in (
        # the UMD build; a page's <script> makes ``window.Hls``
        Package(
            "hls.js",
            "1.7.4",
            "sha512-3GlxGdPvT2YHvQYOt+yOzT/DEior/qJVNIylHA77kgeoBTdQQqi70GwefNEUmHQeNGyjC8U62+bruqW/Tpm+tg==",
            ("dist/hls.min.js",),
        ),
        # Medooze's WHIP and WHEP clients: two ES modules with no imports (``WHIPClient``, ``WHEPClient``)
        Package(
            "whip-whep",
            "1.2.0",
            "sha512-CP+Tht3O/N6QLebW5LxsNKgzFN5KX6WinLr1SLs74feagYu+Gqy+0dw48p5RQuE+FlrM4xyOlOdW2UOQwljImA==",
            ("whip.js", "whep.js"),
        ),
    )
}


class Unavailable(RuntimeError):
    """npm is missing or could not fetch the package (and it is not cached): a reason to skip."""


def bundle(name: str) -> Path:
    """The first browser file of package ``name`` (fetched now if not cached); skips the test when
    it cannot be had. Its siblings in ``Package.files`` are in the same extracted tree."""
    try:
        return fetch(PACKAGES[name])
    except Unavailable as exc:
        pytest.skip(str(exc))


#: why a package could not be had, remembered for the rest of the run (npm is asked once)
_unavailable: dict[str, Unavailable] = {}


def fetch(package: Package) -> Path:
    """The package's first browser file, from the cache or fetched into it (under a file lock, so
    concurrent test processes fetch once)."""
    if package.spec in _unavailable:
        raise _unavailable[package.spec]
    CACHE.mkdir(parents=True, exist_ok=True)
    with _locked(CACHE / ".lock"):
        done = package.directory / ".complete"
        if not done.exists():
            try:
                _fetch(package)
            except Unavailable as exc:
                _unavailable[package.spec] = exc
                raise
            done.write_text(package.integrity + "\n")
    return package.directory / package.files[0]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fetch(package: Package) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise Unavailable(
            f"npm is not installed (apt-get install nodejs npm), and {package.spec} is not cached in {CACHE}"
        )
    work = Path(tempfile.mkdtemp(prefix="fetch-", dir=CACHE))
    try:
        # npm's own cache and temp files stay in ours: nothing in $HOME or the test run's temp dir
        # and an unreachable registry is one quick failure, not a minute of retries (unless configured)
        env = {
            "npm_config_fetch_retries": "1",
            "npm_config_fetch_retry_mintimeout": "1000",
            "npm_config_fetch_retry_maxtimeout": "2000",
            **os.environ,
            "TMPDIR": str(work),
            "npm_config_cache": str(CACHE / "npm"),
            "npm_config_update_notifier": "false",
            "npm_config_fund": "false",
            "npm_config_audit": "false",
        }
        try:
            result = subprocess.run(
                [npm, "pack", package.spec, "--pack-destination", str(work)],
                capture_output=True,
                text=True,
                env=env,
                timeout=NPM_TIMEOUT_S,
                cwd=work,
            )
        except subprocess.TimeoutExpired:
            raise Unavailable(
                f"npm pack {package.spec} took over {NPM_TIMEOUT_S} s (is the npm registry reachable?)"
            ) from None
        tarballs = sorted(work.glob("*.tgz"))
        if result.returncode != 0 or len(tarballs) != 1:
            lines = [
                line.removeprefix("npm error").strip()
                for line in (result.stderr or result.stdout).splitlines()
            ]
            said = [line for line in lines if line and "complete log" not in line][:2]
            raise Unavailable(
                f"npm pack {package.spec} failed (is the npm registry reachable?): " + " | ".join(said)
            )
        data = tarballs[0].read_bytes()
        integrity = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
        if integrity != package.integrity:
            raise AssertionError(f"{package.spec} from npm is {integrity}, pinned {package.integrity}")
        staged = work / "package"
        with tarfile.open(tarballs[0]) as archive:
            wanted = {f"package/{name}" for name in (*package.files, "package.json", "LICENSE")}
            members = [member for member in archive.getmembers() if member.name in wanted]
            missing = {f"package/{name}" for name in package.files} - {m.name for m in members}
            if missing:
                raise AssertionError(f"{package.spec} lacks {sorted(missing)}")
            archive.extractall(work, members=members, filter="data")
        shutil.rmtree(package.directory, ignore_errors=True)
        staged.rename(package.directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    for known in PACKAGES.values():
        print(fetch(known))
