"""pmnc's benchmark: `pmnc.safe` next to raw Berkeley DB, its peers and the disk's fsync rate.

    ./dev bench [--duration 3] [--stores pmnc,berkeleydb,...] [--configs 1x1,4x8]
                [--ops set_new,overwrite,get,mixed] [--dir DIR] [--json FILE] [--quick]

Every cell (store x operation x processes x threads) runs on a fresh store directory, in
processes forked from a parent that never opens a store itself, so no handle crosses a fork.
The modules: `stores` (one adapter per store), `runner` (fork, threads, latency histograms),
`fsync` (the physical limit), `report` (tables, ratios, targets), `cli` (options, the run).

    ./dev bench --http-only [--rounds 3] [--baseline-runtime PATH] [--kill-recovery N]

The HTTP part (`--http`, or `--http-only` for it alone): `http` starts pmnc-runtime and
gunicorn's gthread worker (`wsgi`: the same example modules as a WSGI app) at the same workers
x threads, loads each with wrk (`wrk`: a generated Lua script, results as JSON), and measures a
fresh client while `hostile` holds idle keep-alive and slow-head connections open.

    ./dev bench footprint | queues | replication [OPTIONS]

Separate benchmarks with their own options (`--help`): `footprint` (disk per payload byte),
`queues` (durable queues and expiry), `replication` (durable writes/s over HTTP against one
node and against a 3-node group per ack policy, failover after kill -9 of the master's node).
"""
