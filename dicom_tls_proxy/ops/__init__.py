"""What operators see and the process around the proxy: log lines and the association record, audit
file, syslog, metrics, the folder watcher, pid file and signals.

Floor 5: may import the floors below; never `engine`.
"""
