"""The byte streams the proxy speaks over: TCP (`sockio`), TLS (`tlscontext`, `tlsstream`,
pyOpenSSL's private API in `_openssl`), whole PDUs and closes (`streams`).

Floor 4: may import the floors below (`protocol`, `security`, `config`).
"""
