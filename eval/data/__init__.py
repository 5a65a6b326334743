"""Data shipped with ``twilight_eval``: original essays (RULER haystack, default ppl text) and word lists."""
