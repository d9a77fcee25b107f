"""The node classes: each ``*_nodes.py`` exports ``NODES`` (collected by ``nodes.collect_nodes``)."""
