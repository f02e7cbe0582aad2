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
