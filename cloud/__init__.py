"""The DiReDi cloud: ML (KD, RD update, export, gate), the simulation and the operator CLI."""
