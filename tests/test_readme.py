"""Every ```python block in README.md runs as written, and leaves no file behind."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def setup_command(number: int) -> str:
    """The command under ``# <number>.`` in the README's "Set up" block."""
    setup = README.read_text().split("\n## Set up\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"^# {number}\. .*\n(.+)$", setup, flags=re.M)
    assert match, f"README 'Set up' has no command {number}"
    return match.group(1)


def test_ci_runs_the_readmes_test_command_as_written_in_a_fresh_environment_of_its_own():
    main_job, tests = setup_command(1), setup_command(2)
    assert tests.endswith("pytest") and 'pip install -e ".[dev]"' in tests
    # Its own environment: command 1's has the examples extra installed already, so it would not be fresh.
    environment = re.compile(r"python3 -m venv (\S+) && \. (\S+)/bin/activate")
    (made, activated), (other, _) = environment.match(tests).groups(), environment.match(main_job).groups()
    assert made == activated and made != other
    # .ci/run runs that very line (``|| exit 1`` only stops CI where ``set -e`` would not).
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert f"{tests} || exit 1" in ci
    assert f"rm -rf {made}" in ci[: ci.index(f"{tests} || exit 1")]  # fresh, also on a CI machine that ran before


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "__readme__"})
    # A reader runs them in their own directory: no ./checkpoints/ or ./lightning_logs/ left there.
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_the_fabric_example_prints_what_ldb_did_in_each_epoch(tmp_path, monkeypatch, capsys):
    [block] = [b for b in BLOCKS if "fabric=fabric" in b]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md (Fabric example)", "exec"), {"__name__": "__readme__"})
    rows = [line.split(" ", 2) for line in capsys.readouterr().out.splitlines() if re.match(r"\d+ (full|drop) ", line)]
    assert [(epoch, mode) for epoch, mode, _ in rows] == [("0", "full"), ("1", "full"), ("2", "drop"), ("3", "full")]
    dropped = {epoch: ast.literal_eval(layers) for epoch, _, layers in rows}  # the printed tuple of layer names
    assert dropped["0"] == dropped["1"] == dropped["3"] == () and dropped["2"]
