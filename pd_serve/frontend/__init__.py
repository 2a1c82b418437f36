"""Former name of the gateway (pd_serve.gateway); kept as an alias for old imports."""
