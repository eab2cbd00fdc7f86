"""The serving process (`ckv serve`): an HTTP API in front of one :class:`cachestore.decode.runtime.DecodeRuntime`.

    config.py    ServerConfig: address, batching limits, request limits, how the store is followed
    payloads.py  request bodies (JSON, Arrow IPC) → validated arrays; responses
    arrow_limits.py  an Arrow IPC body read with its decoded sizes checked first (compressed streams)
    errors.py    BadRequest: a refusal naming the field
    batcher.py   dynamic batching: requests queued and grouped into device batches (one worker thread)
    versions.py  hot swap: follows STORE/current, loads a new version in the background
    metrics.py   Prometheus metrics of one server
    app.py       what each route answers: POST /score, GET /healthz, GET /metrics (ScoringService)
    http.py      HTTP/1.1 over asyncio + httptools: keep-alive, pipelining, limits, graceful shutdown
    client.py    clients: one server; ShardRouter, each user to the process serving its shard
    server.py    runs the HTTP server on a bound socket (serve: main thread + signals; RunningServer: a thread)

See docs/serving.md, "The serving process".
"""
