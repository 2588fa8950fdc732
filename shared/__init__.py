"""What the gateway and the worker both need: settings, key names, the event codec, Redis."""
