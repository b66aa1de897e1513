"""The python-backend models of a generated repository.

Each ``<model>/1/model.py`` the repository writer emits is a two-line shim importing
``TritonPythonModel`` from a module here, so the server and the runtime run one implementation of
preprocessing and fusion, and a repository never holds a stale copy of it. These modules run
inside Triton's python-backend stub (``triton_python_backend_utils`` is importable only there);
``bgevl-serve`` makes the ``bgevl`` package importable in the stub by putting this environment's
``bin`` first on ``PATH`` (the stub resolves ``python3`` there and activates that environment).
"""
