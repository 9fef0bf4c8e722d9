"""The SQL registry (DESIGN §4): tables, migrations, and the functions every service calls."""
