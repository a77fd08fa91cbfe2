"""Governance: what a request costs and who may spend what.

Owns pricing now (`pricing`: the price book loaded from the pricing file, list-price cost of
one request in integer micro-dollars, GPU pools and the work units each request uses;
`stamp`: writes those figures onto each UsageEvent before the sinks see it). Keys and budgets
will live next to it (they reserve worst-case spend at admission with
`PriceBook.list_cost_micros` and settle at the end).

Pure data and arithmetic: the only I/O is reading the pricing file once at start.
"""
