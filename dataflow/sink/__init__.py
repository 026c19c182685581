"""The Bytewax sink: what to do with each failure of a commit, and the commit thread."""
