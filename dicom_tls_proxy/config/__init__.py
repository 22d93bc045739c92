"""What a config is (`schema`, no OpenSSL) and how a TOML file and the files it names become one
(`load`).

Floor 3: may import `protocol` and `security`.
"""
