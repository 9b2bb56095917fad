"""One module per ``serve`` kind; importing this package registers them all in ``SERVERS``.

Each module imports its heavy library (torch, llama_cpp) inside the builder, so listing the
kinds (validation, ``--help``) stays cheap.
"""

from engine.serve.backends import hf, llamacpp  # noqa: F401
