"""Several instances as one pool, over Ray (`--ray-address`); nothing here is imported on
one instance (app.py imports `pool.ClusterPool` only when a cluster is asked for, and
Ray only inside the functions that run then).

    pool.py       ClusterPool: the service's pool (warm_pool.Pool) over every node; the
                  dispatch loop, lost nodes, honest re-runs
    node_pool.py  NodePool: the Ray actor on each node, holding that node's WarmPool
    records.py    what the head keeps of nodes and jobs, and the cluster seen as one pool
"""
