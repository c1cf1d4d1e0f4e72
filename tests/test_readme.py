"""The README's quick start is what CI runs: its test command must appear verbatim in .ci/run."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def quick_start_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    cmds = quick_start_commands()
    assert len(cmds) == 2 and all("\n" not in c for c in cmds), cmds
    assert "pytest" in cmds[1]
    assert cmds[1] in (ROOT / ".ci" / "run").read_text()


def python_examples():
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)\n```", readme, flags=re.S)


@pytest.mark.parametrize("index", range(3))
def test_readme_python_examples_run(index, capsys):
    """Every Python example in the README runs as printed (the outputs shown next to them came from these)."""
    examples = python_examples()
    assert len(examples) == 3, "update the parametrization when the README's examples change"
    if "transformers" in examples[index]:
        pytest.importorskip("transformers")
    exec(compile(examples[index], f"README.md example {index}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out  # each example prints what the README shows
