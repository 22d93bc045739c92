"""The proxy at work: accepting, one connection's driver, the relay, routing, reload and drain, and
the C-ECHO probe with the route health checks built on it.

Floor 6: may import every floor below.
"""
