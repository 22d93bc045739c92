"""Certificate decisions and access control: thumbprints, matchers, certificate files, the
certificate policy. Decides; never opens a socket.

Floor 2: may import `protocol`.
"""
