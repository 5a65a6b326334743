"""Twilight test suite (a package, so that top-level test modules never clash with same-named ones in subfolders)."""
