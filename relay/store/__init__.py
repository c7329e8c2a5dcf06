"""Where keys, reservations, the ledger and daily usage live."""
