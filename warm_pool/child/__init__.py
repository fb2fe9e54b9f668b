"""What runs only in the pool's child processes: the template and the processes forked
from it, which run the jobs. Nothing here is imported by the service's process (the
supervisor's side reaches the template only through `template_link.py`, by module name
and socket); that is the trust boundary in the tree (tests/test_structure.py checks it).

    template.py       the pre-importing fork server (started as `python -P -m warm_pool.child.template`)
    preload.py        what the template imports beyond the backend, and each module's companions
    worker.py         a forked process's life: confine, start the device, run the job, end
    library_state.py  the libraries' process-wide state a job's start resets (numpy's seed)
    isolation.py, native_state.py, integrity.py
                      the reuse mode only: what a job changed, restored, or detected (fingerprint)
"""
