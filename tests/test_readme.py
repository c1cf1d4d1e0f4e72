"""The README's quick start is what CI runs (its test command must appear verbatim in .ci/run), and its Python
examples print what the README shows."""

import os
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
    """[(code, shown output)]: each ```python block of the README with the plain ``` block that follows it."""
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)\n```\n(?:[^`]*?\n)?```\n(.*?)```", readme, flags=re.S)


def _normalized(text):
    """Error magnitudes (1.23e-07) differ between machines and thread counts; everything else must match."""
    lines = [re.sub(r"\d\.\d\de[-+]\d\d", "<err>", line.rstrip()) for line in text.strip().splitlines()]
    return [re.sub(r" +", " ", line) for line in lines]


@pytest.mark.parametrize("index", range(4))
def test_readme_python_examples_print_what_the_readme_shows(index, capsys, monkeypatch):
    """Every Python example in the README runs as printed and prints the output shown after it. The dispatch
    record starts empty, as in a fresh process (gptkernels.explain() reports this process's calls)."""
    from gptkernels import _dispatch

    examples = python_examples()
    assert len(examples) == 4, "update the parametrization when the README's examples change"
    code, shown = examples[index]
    if "transformers" in code:
        pytest.importorskip("transformers")
    for var in [k for k in os.environ if k.startswith("GPTKERNELS_")]:
        monkeypatch.delenv(var)
    monkeypatch.setattr(_dispatch, "_LAST", {})
    capsys.readouterr()
    exec(compile(code, f"README.md example {index}", "exec"), {"__name__": "__readme__"})
    assert _normalized(capsys.readouterr().out) == _normalized(shown)
