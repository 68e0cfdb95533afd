"""One module per training mechanism; train.py wires them together."""
