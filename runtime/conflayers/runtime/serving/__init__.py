"""Serving: the OpenAI-compatible HTTP server over an engine, by concern.

  schema.py     request fields -> engine arguments, response bodies, ApiError
  admission.py  resource bounds (ServerLimits) and the slots requests wait for
  metrics.py    Prometheus counters, gauges, histograms
  http.py       routes, the handler (JSON and Server-Sent Events streaming), make_server
  cli.py        conflayers-serve
"""
