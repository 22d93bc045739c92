from dicom_tls_proxy.cli import main

main()
