"""The ``agent-runtime bench`` suites: ``memory`` (the bank against FAISS baselines), ``serve``
(concurrent websocket clients against real ``serve`` processes), ``privacy`` (recall against
noise). ``launch.py`` starts ``serve`` subprocesses for the benchmarks and the tests.

They live here, in a sub-package of the CLI, so that ``agent-runtime bench`` works from an
installed package, and outside the runtime packages they measure."""
