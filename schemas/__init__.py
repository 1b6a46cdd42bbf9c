"""The wire contract between the controller and the host agents.

Everything that crosses MQTT is a msgspec Struct defined in `messages`, published on a
topic built by `topics`, and decoded strictly by `codec`. This package imports no I/O
library, so both sides (and the tests) can use it without a broker.
"""
