"""The orkestr add-ons controller.

It owns the truth about projects, add-ons and jobs (PostgreSQL), serves the user and
agent HTTP APIs, publishes one retained desired-state snapshot per host over MQTT and
ingests what the host agents report back. See `app.run` for how the parts fit together.
"""
