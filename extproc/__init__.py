"""Token metering and chargeback sidecar for Envoy (ext_proc) in front of vLLM."""

__version__ = "0.1.0"
