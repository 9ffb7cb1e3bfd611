"""(being written: see the issue that introduces it)."""
