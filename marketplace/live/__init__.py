"""Live dashboards over Channels.

Figures reach the pages in batches, never one message per request:

* usage ingest (``billing.usage``) publishes, after each batch commits, ONE message per
  organisation and per vendor it touched, and one for the operations group, carrying the
  batch's sums (``marketplace.live.figures``);
* a beat task (``marketplace.tasks.live_numbers_push``) pushes the gateway's live numbers
  (utilisation, current price, circuit state, latency, requests per second) from Redis to the
  vendor groups and the operations group every few seconds;
* WebSocket consumers (``marketplace.live.consumers``) let a signed-in member join their
  organisation's or vendor's group (staff the operations group) and forward the messages.

Every message the browser receives is ``{"kind": "figures", "mode": "add" | "set",
"values": {key: number | text}}``; ``static/switchyard.js`` updates the elements whose
``data-live-key`` is the key. The pages render the same keys server-side, so they work
without WebSockets.
"""
