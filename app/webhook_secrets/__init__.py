"""Webhook signing: each tenant's secrets (read, rotate) and its jobs' delivery log."""
