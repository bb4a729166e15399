"""Fetch transformers' own common test mixins for `tests/test_transformers_common.py`.

The mixins (`tests/test_modeling_common.py`, `tests/test_configuration_common.py`) are not in the transformers wheel;
they ship in its source distribution. This script downloads the sdist of the *installed* transformers version with pip
and extracts its top-level `tests/` folder into DEST, so the common tests always match the library they test:

    python tests/fetch_transformers_tests.py DEST
    PISCES_TRANSFORMERS_TESTS=DEST python -m pytest tests/test_transformers_common.py

Exits non-zero (and leaves no half-extracted DEST) when the sdist cannot be downloaded or lacks the mixins, so a CI
step built on it fails instead of skipping the common tests.
"""

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


# Files the harness imports; their absence means the sdist layout changed and the harness must be looked at.
REQUIRED_FILES = ("test_modeling_common.py", "test_configuration_common.py")
VERSION_FILE = "TRANSFORMERS_VERSION"


def installed_transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def download_sdist(version: str, into: Path) -> Path:
    """`pip download` the transformers sdist of `version` (no wheel, no dependencies); returns the archive's path."""
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
        f"transformers=={version}", "--dest", str(into),
    ]
    if subprocess.run(command).returncode != 0:
        raise OSError(f"pip could not download the transformers {version} sdist (command: {' '.join(command)})")
    archives = sorted(into.glob(f"transformers-{version}.tar.gz"))
    if not archives:
        raise FileNotFoundError(f"pip download gave no transformers-{version}.tar.gz in {into}: {list(into.iterdir())}")
    return archives[0]


def extract_tests(archive: Path, version: str, dest: Path) -> Path:
    """Extracts `transformers-<version>/tests/*` of `archive` into `dest` (which must not exist yet)."""
    prefix = f"transformers-{version}/tests/"
    with tempfile.TemporaryDirectory() as scratch, tarfile.open(archive) as sdist:
        members = [member for member in sdist.getmembers() if member.name.startswith(prefix) and member.isfile()]
        if not members:
            raise FileNotFoundError(f"{archive.name} holds no {prefix} folder")
        sdist.extractall(scratch, members=members, filter="data")
        extracted = Path(scratch) / prefix
        missing = [name for name in REQUIRED_FILES if not (extracted / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{archive.name} lacks {', '.join(prefix + name for name in missing)}")
        # The transformers repository's tests/ is a package (an empty __init__.py, which the sdist leaves out): the
        # mixins import their siblings relatively, and test_configuration_common.py execs that __init__.py.
        (extracted / "__init__.py").touch()
        (extracted / VERSION_FILE).write_text(version + "\n")
        shutil.copytree(extracted, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="folder to create with the sdist's tests/ (must not exist)")
    parser.add_argument("--version", help="transformers version (default: the installed one)")
    args = parser.parse_args(argv)
    if args.dest.exists():
        parser.error(f"{args.dest} exists; pass a new folder")
    version = args.version or installed_transformers_version()
    try:
        with tempfile.TemporaryDirectory() as download_dir:
            archive = download_sdist(version, Path(download_dir))
            extract_tests(archive, version, args.dest)
    except OSError as error:  # FileNotFoundError included
        print(f"fetch_transformers_tests: {error}", file=sys.stderr)
        return 1
    print(args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
