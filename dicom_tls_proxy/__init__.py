"""dicom-tls-proxy: the TLS front door for DICOM devices too old to speak TLS themselves."""

__version__ = "0.1.0"
