"""Training and evaluation of the bundled byte model: synthetic data (``data.py``), the
resumable trainer (``train.py``, ``agent-runtime train``) and recall / perplexity / speed
evaluation (``evaluate.py``, ``agent-runtime eval``)."""
