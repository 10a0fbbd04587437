"""The per-tenant usage ledger: what each (API key, model) got from the backends' prefix caches,
and what routing did for it (usage.py reads the answers, ledger.py counts and flushes)."""
