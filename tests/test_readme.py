"""Every Python snippet in the README runs as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_two_commands_first():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    assert "pip install torch==2.13.0" in first_block and "peftc demo" in first_block
    assert "python -m pytest" in first_block


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    snippets = _snippets()
    assert snippets
    monkeypatch.chdir(tmp_path)
    for code in snippets:
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
