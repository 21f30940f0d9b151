"""Every Python snippet in the README runs as written, and so does every cheap shell command in it."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# README commands this file does not run, and where each is run instead
NOT_RUN_HERE = {
    "pip install": "the install itself",
    "python -m pytest": "the test run itself",
    "peftc demo": "tests/test_cli.py::test_demo",
    "peftc generate": "tests/test_cli_generate.py",
    "python examples/classify_minilm.py": "tests/test_examples.py::test_classify_minilm",
    "python examples/causal_lm_llama.py": "tests/test_examples.py::test_causal_lm_llama",
    "python examples/multi_adapter_serving.py": "tests/test_examples.py::test_multi_adapter_serving",
    "python examples/custom_method.py": "tests/test_examples.py::test_custom_method",
}


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def _commands() -> list[str]:
    lines = [line.strip() for block in _blocks("bash") for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _cheap_commands() -> list[str]:
    return [c for c in _commands() if not any(skip in c for skip in NOT_RUN_HERE)]


def test_readme_has_the_two_commands_first():
    first_block = _blocks("bash")[0]
    assert "pip install torch==2.13.0" in first_block and "peftc demo" in first_block
    assert "python -m pytest" in first_block


def test_readme_sections_in_order():
    heads = re.findall(r"^## (.+)$", README.read_text(), flags=re.M)
    order = ["Quickstart", "peftc and PEFT", "Benchmarks", "Supported", "Limitations"]
    assert [h for h in heads if h in order] == order


def test_quickstart_is_at_most_ten_lines():
    quickstart = _blocks("python")[0]
    assert len([line for line in quickstart.splitlines() if line.strip()]) <= 10


@pytest.mark.slow
def test_readme_python_snippets_run(tmp_path, monkeypatch):
    snippets = _blocks("python")
    assert snippets
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}         # later snippets go on from the quickstart, as a reader would
    for code in snippets:
        exec(compile(code, str(README), "exec"), namespace)
    assert namespace["mixed"].logits.shape[0] == 4
    assert namespace["per_row"].shape[0] == 4 and namespace["greedy"].shape[0] == namespace["drawn"].shape[0] == 2
    assert 16 < namespace["greedy"].shape[1] <= 24 and namespace["folded"].shape[0] == 2   # prompt 16, 8 new at most
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "merged" / "config.json").is_file()
    assert (tmp_path / "out" / "model.pt2").is_file()


def test_readme_commands_are_all_accounted_for():
    cheap = _cheap_commands()
    assert any(c.startswith("peftc --help") for c in cheap) and any(c.startswith("peftc inspect") for c in cheap)
    assert all(any(skip in c for skip in NOT_RUN_HERE) for c in _commands() if c not in cheap)


@pytest.mark.slow
def test_readme_shell_commands_run(tmp_path):
    """The cheap commands, in README order, in a fresh directory (examples/ linked in), with this venv's peftc."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               HF_HUB_OFFLINE="1")
    for cmd in _cheap_commands():
        r = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{cmd!r} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        if cmd.startswith("peftc inspect"):
            assert "site(s) adapted" in r.stdout, r.stdout
    assert (tmp_path / "out" / "ex" / "merged-cli" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "ex" / "model-cli.pt2").is_file()


@pytest.mark.parametrize("path", re.findall(r"\]\(([^)#]+)\)", README.read_text()))
def test_readme_links_exist(path):
    if not path.startswith("http"):
        assert (ROOT / path).exists(), path
