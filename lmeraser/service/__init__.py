"""`lmeraser serve`: the HTTP API for deletion and rectification requests, with its batch worker.

auth    the bearer token ($LMERASER_API_TOKEN, or created 0600 under audit/keys/)
worker  exact batches inside the service, one at a time, under the CLI's `unlearn` lock
app     the versioned JSON API (FastAPI), the same validation and journal as the CLI
client  what `lmeraser forget|rectify|requests --server URL` calls
"""
