"""One module per pipeline stage; each runs alone (see its docstring)."""
