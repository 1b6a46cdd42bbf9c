"""The host agent: reconciles this host's Docker containers toward the desired state."""
