"""What the proxy keeps on disk for a store-and-forward route: the spool. Below `ops` and
`engine`, above `transport`: the engine stores and forwards through it, the metrics and the CLI
read its size."""
