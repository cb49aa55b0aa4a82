"""What participants and the coordinator must agree on: data records, pieces, seeds, messages."""
