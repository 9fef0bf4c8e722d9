"""The MQTT broker side: mosquitto's production configuration and its dynamic-security administration,
and an embedded pure-Python broker (amqtt) that enforces the same credentials and ACL for the demo and
the unit tests. Imports only the wire contract."""
