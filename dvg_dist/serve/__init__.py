"""The video server (docs/serve.md): a Ray Serve application whose replicas are sequence-parallel groups of
ranks, behind an OpenAI-style ``/v1/videos`` HTTP API (submit, poll, fetch, cancel), with a bounded queue and
Prometheus metrics.

- :mod:`.options`: the server's settings (``launch/serve.py`` flags, ``args`` of a Serve config file), checked
  before Ray starts;
- :mod:`.jobs`: a request body → a validated job (the CLI's checks), and the job table: the bounded FIFO queue, the
  five states, progress, cancellation, replicas' leases and the metrics (no Ray);
- :mod:`.ranks`: the rank actors of one replica (each holds a :class:`dvg_dist.DVG` in one process group) and the
  loop that runs one job on all of them;
- :mod:`.app`: the Serve deployments (``VideoServer``, the HTTP ingress; ``JobBoard``, the job table;
  ``GroupWorker``, one replica per group) and ``build_app``, the application builder ``serve run`` / ``serve
  deploy`` import;
- :mod:`.cli`: ``launch/serve.py``.

Importing this package imports neither Ray nor torch; :mod:`.app` and :mod:`.ranks` need the ``ray`` extra.
"""
