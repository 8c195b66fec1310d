"""tests/conftest.py fails a run on a skip that tests/allowed_skips.txt does not allow, and lists it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

SAMPLE_TESTS = """
import pytest

def test_runs():
    pass

def test_allowed():
    pytest.skip("no frobnicator here")

def test_unexpected():
    pytest.skip("something silently missing")

@pytest.mark.xfail(reason="known bug")
def test_expected_failure():
    assert False
"""


def run_pytest(tmp_path, tests, allow_any=False):
    folder = tmp_path / "tests"
    folder.mkdir(exist_ok=True)
    shutil.copy(HERE / "conftest.py", folder / "conftest.py")
    (folder / "allowed_skips.txt").write_text("# allowed\ntests/test_sample.py::test_allow* | frobnicator  # why\n")
    for name, text in tests.items():
        (folder / name).write_text(text)
    env = {key: value for key, value in os.environ.items() if key != "NANOMARKOV_ALLOW_SKIPS"}
    if allow_any:
        env["NANOMARKOV_ALLOW_SKIPS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def unexpected_section(output):
    """The lines of the guard's section, up to pytest's own summary."""
    if "not allowed by" not in output:
        return ""
    return output.split("skips not allowed by tests/allowed_skips.txt", 1)[1].split("short test summary info")[0]


def test_an_unexpected_skip_fails_the_run_and_is_named(tmp_path):
    missing_module = "import pytest\npytest.importorskip('no_such_module_here')\n\ndef test_x():\n    pass\n"
    done = run_pytest(tmp_path, {"test_sample.py": SAMPLE_TESTS, "test_needs_module.py": missing_module})
    assert done.returncode == 1, done.stdout
    section = unexpected_section(done.stdout)
    assert "tests/test_sample.py::test_unexpected: something silently missing" in section
    assert "tests/test_needs_module.py: could not import 'no_such_module_here'" in section
    assert "test_allowed" not in section and "xfail" not in section
    assert "SKIPPED [1] tests/test_sample.py" in done.stdout  # -rs lists every skip, allowed ones too


def test_only_allowed_skips_pass(tmp_path):
    allowed_only = SAMPLE_TESTS.replace('pytest.skip("something silently missing")', "pass")
    done = run_pytest(tmp_path, {"test_sample.py": allowed_only})
    assert done.returncode == 0, done.stdout
    assert "not allowed by" not in done.stdout and "1 skipped" in done.stdout


def test_the_escape_hatch_lists_without_failing(tmp_path):
    done = run_pytest(tmp_path, {"test_sample.py": SAMPLE_TESTS}, allow_any=True)
    assert done.returncode == 0, done.stdout
    assert "test_unexpected: something silently missing" in unexpected_section(done.stdout)


def test_a_failing_run_stays_failing(tmp_path):
    failing = SAMPLE_TESTS + "\ndef test_fails():\n    assert False\n"
    assert run_pytest(tmp_path, {"test_sample.py": failing}).returncode == 1


@pytest.mark.parametrize("line", ["tests/x.py::test_y", "| reason only"])
def test_a_malformed_allow_list_is_a_usage_error(tmp_path, line):
    import conftest

    path = tmp_path / "allowed.txt"
    path.write_text(line + "\n")
    with pytest.raises(pytest.UsageError, match="line 1: expected 'NODE_ID_GLOB | REASON TEXT'"):
        conftest.read_allowed(path)


def test_the_project_allow_list_reads():
    import conftest

    assert all(pattern.startswith("tests/") for pattern, _ in conftest.read_allowed())
