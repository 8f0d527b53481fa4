"""Avro wire format of events: schemas, catalogue and the single-object codec."""
