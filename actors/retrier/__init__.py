"""Delivery retrier actor: persistent outbox, priorities, acks, retries, failover."""
