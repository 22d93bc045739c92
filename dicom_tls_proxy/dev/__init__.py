"""The development PKI behind `certs init`, the demo and the tests. Not for production, and not
part of the product's API.

Beside the floors: imports nothing of the package; only the CLI, the demo and the tests import
it.
"""
