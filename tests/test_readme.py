"""The README's Python examples run as written and print what they claim."""
import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_examples_run_and_print_what_they_claim():
    blocks = python_blocks()
    assert blocks, "README has no python examples"
    for code in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(README), "exec"), {})
        claimed = re.findall(r"print\(.*\)\s+# (\S+)", code)
        printed = out.getvalue().split()
        for value in claimed:  # every "# value" comment after a print() is checked
            assert value in printed, f"README claims {value!r}, printed {printed}"
