"""The ``tokenrelay`` command: the one place that wires the gateway and the worker together."""
