"""What an auditor runs: verify the signed log against the deployed artifacts, scan every store
for forgotten bytes, replay a record's training, and write a report."""
