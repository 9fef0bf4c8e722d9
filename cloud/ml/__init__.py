"""The cloud's ML: datasets, networks, KD, int8 export, the RD update, re-KD and the gate.

Services (the simulation now, Celery tasks later) call these functions; nothing here knows about
MQTT, SQL or HTTP. Every stage takes and returns named things that can be stored.
"""
