"""Applications built on the library: the ``mbwq`` command (cli.py), the demo (demo.py), the
demo's Llama-style model (tiny_llama.py), MiniLM for the quality bench (minilm.py) and the
argument types they share (args.py). Nothing in the library imports this package."""
