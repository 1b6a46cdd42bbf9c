"""`orkestr`: the command-line client of the controller's HTTP API (Click + Rich)."""
