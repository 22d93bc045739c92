"""PS3.8 and PS3.7 as data, and the association model: pure, no I/O, no clock.

Floor 1: imports nothing else of the package.
"""
