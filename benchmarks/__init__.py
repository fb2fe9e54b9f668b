"""Cold against warm: `python -m benchmarks.run` (or `make bench`).

Modules, one per concern:

    workloads  the scripts that are timed, per backend
    cold       the original service's way: one `python main.py` subprocess per script
    library    the warm pool driven directly (no HTTP): latency, dispatch, replacement,
               timeouts, memory, throughput
    service    the HTTP service started as a subprocess: latency, batches, throughput
    report     statistics, the machine, the table, the JSON and the plot
    run        the command line that runs them in order and writes benchmarks/results/

On its own: `python -m benchmarks.reuse_restore`, what a reused worker's restore costs
after an empty job.
"""
