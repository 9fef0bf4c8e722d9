"""System tests: the cloud's services, a real broker and real device daemons, through a whole scenario."""
