"""Engine backends: the interface, the registry, and each backend's builder and runner."""
