"""What people and programs use onelane through: submit(), batches, status and the CLI."""
