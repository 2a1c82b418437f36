"""The resident serving process: stateless until given a role, then a prefill or decode instance."""
