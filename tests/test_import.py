"""`import mbwq_ops` without its compiled library says how to build it."""
import subprocess
import sys

BLOCK_C = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mbwq_ops._C":
            raise ImportError("simulated: no compiled library")
sys.meta_path.insert(0, Block())
try:
    import mbwq_ops
except ImportError as e:
    print(e)
else:
    print("imported")
"""


def test_missing_compiled_library_explains_how_to_build():
    out = subprocess.run([sys.executable, "-c", BLOCK_C], capture_output=True, text=True,
                         timeout=120).stdout
    assert "mbwq_ops._C" in out and 'pip install --no-build-isolation -e ".[test]"' in out, out


def test_library_import_loads_neither_quantizer_nor_applications():
    # a fresh interpreter: other tests have imported everything into this one
    import subprocess
    import sys
    code = ("import sys, mbwq_ops; "
            "print(sorted(m for m in sys.modules if m.startswith(('mbwq_ops.quant', 'mbwq_ops.apps'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    check = ("import mbwq_ops; assert callable(mbwq_ops.quantize_model); "
             "assert mbwq_ops.load_strategy is mbwq_ops.quant.load_strategy")
    subprocess.run([sys.executable, "-c", check], check=True)
