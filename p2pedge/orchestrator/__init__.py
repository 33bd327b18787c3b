"""p2pedge.orchestrator."""
