"""The orchestrator: Generate RPC and job lifecycle. `jobs` is its persistent job table (no gRPC in it)."""
