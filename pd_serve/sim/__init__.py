"""Discrete-event simulator of P/D serving that drives the real policy code (gateway forwarding,
prefill admission, decode selection, group formation, ratio planning and adjustment) on a
virtual clock, with latency models fitted from measured profiles."""
