"""Adapters from the pure core to Kafka, PostgreSQL, Avro and the embedded servers."""
