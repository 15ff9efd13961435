"""chatkit's examples: runnable programs (``python examples/NAME.py``) and
server plugins importable as ``examples.NAME`` from the repository root
(``python -m chatkit.server --plugin examples.profanity_filter:ProfanityFilter``)."""
