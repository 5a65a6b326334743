"""Data shipped with ``twilight_eval``: original essays (the start of RULER's essay haystack, the default ppl text)."""
