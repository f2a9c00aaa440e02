"""Webhooks: events (balance low, a key's spend limit reached, uncharged usage) POSTed
to the operator's URL, signed, retried until accepted (docs/operations.md#webhooks).

Events are born in the store, in the transaction of the change that causes them
(bastion/store/outbox.py); ``sender`` delivers them from any gateway with
``[webhooks] url`` set; ``sign`` makes and checks the signature header.
"""
