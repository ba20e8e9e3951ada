"""The README's library tour runs exactly as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_library_tour_runs_as_written(capsys):
    text = README.read_text()
    tour = text[text.index("## Library tour"):]
    code = re.search(r"```python\n(.*?)```", tour, re.S).group(1)
    assert len(code.strip().splitlines()) <= 15
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "torch.Size([5, 2])"


def test_quick_start_is_two_make_commands():
    text = README.read_text()
    quick = text[text.index("## Quick start"):text.index("## Library tour")]
    block = re.search(r"```bash\n(.*?)```", quick, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["make demo", "make test"]
    makefile = (README.parent / "Makefile").read_text()
    assert "torch==2.13.0" in makefile
    assert "make test" in (README.parent / ".ci" / "run").read_text()
