"""runtime: where and how work runs: device choice and the CPU allocator setting
(:mod:`~embedcache.runtime.devices`), torchrun's ranks (:mod:`~embedcache.runtime.distributed`),
work ahead or behind in a thread (:mod:`~embedcache.runtime.readahead`), and the CPU's identity,
threads and cgroup quota (:mod:`~embedcache.runtime.cpu`)."""
