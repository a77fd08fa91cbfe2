"""Tools for development and trying it out, not the sidecar's runtime: the vLLM-compatible
simulator (sim/), the local stack (devstack), the demo, and Envoy config rendering
(envoy_config, behind `extproc envoy-config`). The runtime (server, exchange, processors,
storage, telemetry, governance, workers) never imports from here.
"""
