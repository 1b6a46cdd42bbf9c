"""The wire contract between the controller and the host agents.

Everything that crosses MQTT is a msgspec Struct defined in `messages`, published on a
topic built by `topics`, and decoded strictly by `codec`. Desired states travel signed
(`signed`); who may use which topic is `broker_acl`, and both services build their TLS
client context with `mqtt_tls`. This package imports no I/O library, so both sides (and
the tests) can use it without a broker.
"""
