"""HTTP server pieces the controller and the agent share (aiohttp; neither package's own
code: this package imports neither of them)."""
