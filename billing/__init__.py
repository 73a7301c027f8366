"""Money: the double-entry ledger, usage records, credits, vendor earnings and payouts."""
