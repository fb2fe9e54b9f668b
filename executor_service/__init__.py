"""Trainium Executor HTTP service on top of the warm pool.

Modules, one role each:

    service      the composition root: builds and owns the pool, store, metrics, runner,
                 queue intake and Spot watcher
    app          the Flask app: route groups given what they use (submissions, health, jobs)
    serve        waitress, the process's signals and the drain
    config       settings, flags, environment (declared once; docs/configuration.md)
    validation   request rules; auth (bearer token); http_server (waitress, tuned)
    store        the SQLite job store; jobs (the runner between store and pool)
    streaming    live output (events, polling); follow (the CLI's view of it)
    webhooks     signed callbacks; artifacts (kept files, S3 export)
    sqs_intake   jobs from an SQS queue; spot (interruption notices); idle (idle-stop)
    metrics      Prometheus; logs (JSON lines); analysis (code facts, METRICS lines)
    client, cli  the stdlib-only client and the console script; dashboard (the page)
    cluster/     several instances over Ray (imported only with --ray-address)

The service process never imports torch.
"""
